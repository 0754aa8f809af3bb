"""Attention's value heads (graph/values.py): where an orthogonal map per value head is found,
the function kept exactly in float64 under random maps, Procrustes recovering planted maps, and
the places that are not sites."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from equivariance import rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

import permask
from permask.match.procrustes import match_values


class Attention(nn.Module):
    """Self-attention with separate q/k/v projections written as Hugging Face writes them
    (GQA by ``unsqueeze``/``expand``/``reshape``); ``leak`` reads the value or the attention's
    output a second time, which must refuse the site."""

    def __init__(self, dim=8, heads=4, kv_heads=2, d=3, leak=None):
        super().__init__()
        self.heads, self.kv_heads, self.d, self.leak = heads, kv_heads, d, leak
        self.q, self.k = nn.Linear(dim, heads * d), nn.Linear(dim, kv_heads * d)
        self.v, self.o = nn.Linear(dim, kv_heads * d), nn.Linear(heads * d, dim)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.d).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv_heads, self.d).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv_heads, self.d).transpose(1, 2)
        k, v = self._repeat(k), self._repeat(v)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(b, t, self.heads * self.d)
        out = x + self.o(y)
        if self.leak == "value":
            out = out + v.sum()
        elif self.leak == "output":
            out = out + y.sum(-1, keepdim=True)
        return out

    def _repeat(self, x):
        b, kv, t, d = x.shape
        r = self.heads // kv
        return x.unsqueeze(2).expand(b, kv, r, t, d).reshape(b, kv * r, t, d)


def _net(heads, kv_heads, d, leak=None, seed=0):
    torch.manual_seed(seed)
    model = Attention(8, heads, kv_heads, d, leak).double().eval()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    return model, x, permask.trace(model, x)


@settings(max_examples=20, deadline=None)
@given(
    kv_heads=st.sampled_from([1, 2]), repeat=st.sampled_from([1, 2]),
    d=st.integers(1, 4), seed=st.integers(0, 2**16),
)  # fmt: skip
def test_random_value_maps_keep_the_function(kv_heads, repeat, d, seed):
    model, x, graph = _net(kv_heads * repeat, kv_heads, d, seed=seed % 7)
    (site,) = permask.value_sites(graph)
    assert (site.heads, site.kv_heads, site.head_dim) == (kv_heads * repeat, kv_heads, d)
    maps = permask.random_rotation(graph, torch.Generator().manual_seed(seed))
    only = {site.name: maps[site.name]}
    turned = permask.rotate_model(model, only, graph)
    assert rel_err(model(x), turned(x)) < 1e-12
    if d > 1:  # a 1-dim head's only orthogonal maps are +-1
        assert (turned.v.weight - model.v.weight).abs().max() > 1e-3


def test_procrustes_recovers_planted_value_maps():
    model, x, graph = _net(4, 2, 3)
    (site,) = permask.value_sites(graph)
    planted = permask.random_rotation(graph, torch.Generator().manual_seed(3))[site.name]
    turned = permask.rotate_model(model, {site.name: planted}, graph)
    a, b = dict(model.named_parameters()), dict(turned.named_parameters())
    found = match_values(a, b, site)
    assert (found - planted.transpose(-1, -2)).abs().max() < 1e-10
    back = permask.rotate_model(turned, {site.name: found}, graph)
    for k, v in model.state_dict().items():
        assert (back.state_dict()[k] - v).abs().max() < 1e-12, k


@pytest.mark.parametrize("leak", ["value", "output"])
def test_a_value_or_output_read_elsewhere_is_not_a_site(leak):
    model, x, graph = _net(4, 2, 3, leak)
    assert permask.value_sites(graph) == []


def test_bad_value_maps_are_refused_with_the_fix():
    model, x, graph = _net(4, 2, 3)
    (site,) = permask.value_sites(graph)
    good = permask.random_rotation(graph, torch.Generator().manual_seed(0))[site.name]
    with pytest.raises(ValueError, match="not orthogonal per head"):
        permask.rotate_model(model, {site.name: 2 * good}, graph)
    with pytest.raises(ValueError, match=r"needs \(2, 3, 3\)"):
        permask.rotate_model(model, {site.name: good[:1]}, graph)
    with pytest.raises(ValueError, match="no value site"):
        permask.rotate_model(model, {"value:nope": good}, graph)


def _gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.for_model(
        "gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval().double()
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = permask.trace(model, {"input_ids": ids})
    return model, graph, lambda m: m(input_ids=ids).logits


def _timm_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3, depth=2
    )
    model = model.eval().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    return model, permask.trace(model, x), lambda m: m(x)


@pytest.mark.parametrize(
    "build, where",
    [
        (_gpt2, ("transformer.h.0.attn.c_attn.weight", 1, 64,
                 "transformer.h.0.attn.c_proj.weight", 0)),
        (_timm_vit, ("blocks.0.attn.qkv.weight", 0, 384, "blocks.0.attn.proj.weight", 1)),
    ],
    ids=["gpt2-conv1d-split", "timm-fused-qkv"],
)  # fmt: skip
def test_fused_qkv_value_heads_turn_exactly_and_are_recovered(build, where):
    """A value that is one part of a fused projection: GPT-2's Conv1D split into q, k, v (the
    rows are the weight's columns, from 2C on; the output is Conv1D too) and timm's qkv linear
    reshaped to (3, heads, d). Random maps keep the function (float64), and Procrustes by the
    weights recovers them."""
    model, graph, run = build()
    sites = permask.value_sites(graph)
    assert len(sites) == 2
    first = sites[0]
    assert (first.value, first.value_axis, first.start, first.out, first.out_axis) == where
    drawn = permask.random_rotation(graph, torch.Generator().manual_seed(1))
    maps = {s.name: drawn[s.name] for s in sites}
    turned = permask.rotate_model(model, maps, graph)
    with torch.no_grad():
        assert rel_err(run(model), run(turned)) < 1e-12
    w, w2 = model.get_parameter(first.value), turned.get_parameter(first.value)
    assert (w.narrow(first.value_axis, 0, first.start) == w2.narrow(first.value_axis, 0,
            first.start)).all()  # fmt: skip
    assert (w - w2).abs().max() > 1e-3  # q and k untouched, v moved
    a, b = dict(model.named_parameters()), dict(turned.named_parameters())
    for site in sites:
        assert (match_values(a, b, site) - maps[site.name].transpose(-1, -2)).abs().max() < 1e-10
