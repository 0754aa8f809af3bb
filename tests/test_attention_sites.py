"""The maps inside attention beyond permutations: value heads (graph/values.py) and, without
RoPE, query/key heads (graph/query_keys.py), in own and fused projections (graph/heads.py):
where the sites are found, the function kept exactly in float64 under random maps, Procrustes
recovering planted maps, and the places that are not sites."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from equivariance import rel_err
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

import permask
from permask.graph.turn import within_heads
from permask.match.heads import match_heads
from permask.match.procrustes import match_query_keys, match_values


class Attention(nn.Module):
    """Self-attention with separate q/k/v projections written as Hugging Face writes them
    (GQA by ``unsqueeze``/``expand``/``reshape``); ``leak`` reads the value or the attention's
    output a second time, which must refuse the site; ``scale`` multiplies the query after its
    projection (a number, ``"div"``: divided by 2, ``"gain"``: by a learned gain per channel)."""

    def __init__(self, dim=8, heads=4, kv_heads=2, d=3, leak=None, scale=None):
        super().__init__()
        self.heads, self.kv_heads, self.d, self.leak, self.scale = heads, kv_heads, d, leak, scale
        self.q, self.k = nn.Linear(dim, heads * d), nn.Linear(dim, kv_heads * d)
        self.v, self.o = nn.Linear(dim, kv_heads * d), nn.Linear(heads * d, dim)
        self.gain = nn.Parameter(torch.rand(heads * d) + 0.5) if scale == "gain" else None

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x)
        if self.scale == "gain":
            q = q * self.gain
        elif self.scale == "div":
            q = q / 2.0
        elif self.scale is not None:
            q = self.scale * q
        q = q.view(b, t, self.heads, self.d).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv_heads, self.d).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv_heads, self.d).transpose(1, 2)
        k, v = self._repeat(k), self._repeat(v)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(b, t, self.heads * self.d)
        out = x + self.o(y)
        if self.leak == "value":
            out = out + v.sum()
        elif self.leak == "query":
            out = out + q.sum()
        elif self.leak == "output":
            out = out + y.sum(-1, keepdim=True)
        return out

    def _repeat(self, x):
        b, kv, t, d = x.shape
        r = self.heads // kv
        return x.unsqueeze(2).expand(b, kv, r, t, d).reshape(b, kv * r, t, d)


def _net(heads, kv_heads, d, leak=None, seed=0, scale=None):
    torch.manual_seed(seed)
    model = Attention(8, heads, kv_heads, d, leak, scale).double().eval()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    return model, x, permask.trace(model, x)


#: heads drawn for the property tests: key/value heads, query heads per key head, head dims
HEADS = dict(
    kv_heads=st.sampled_from([1, 2, 3]), repeat=st.sampled_from([1, 2]),
    d=st.integers(1, 4), seed=st.integers(0, 2**16),
)  # fmt: skip


@settings(max_examples=20, deadline=None)
@given(**HEADS)
def test_random_value_and_query_key_maps_keep_the_function(kv_heads, repeat, d, seed):
    model, x, graph = _net(kv_heads * repeat, kv_heads, d, seed=seed % 7)
    (site,) = permask.value_sites(graph)
    (keys,) = permask.query_key_sites(graph)
    for s in (site, keys):
        assert (s.heads, s.kv_heads, s.head_dim) == (kv_heads * repeat, kv_heads, d)
    maps = permask.random_rotation(graph, torch.Generator().manual_seed(seed))
    for name, moved in ((site.name, "v"), (keys.name, "q")):
        turned = permask.rotate_model(model, {name: maps[name]}, graph)
        assert rel_err(model(x), turned(x)) < 1e-12
        if d > 1:  # a 1-dim head's only orthogonal maps are +-1
            w = getattr(model, moved).weight
            assert (getattr(turned, moved).weight - w).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["value", "qk"])
def test_procrustes_recovers_planted_head_maps(kind):
    model, x, graph = _net(4, 2, 3)
    (site,) = permask.value_sites(graph) if kind == "value" else permask.query_key_sites(graph)
    planted = permask.random_rotation(graph, torch.Generator().manual_seed(3))[site.name]
    turned = permask.rotate_model(model, {site.name: planted}, graph)
    a, b = dict(model.named_parameters()), dict(turned.named_parameters())
    found = (match_values if kind == "value" else match_query_keys)(a, b, site)
    assert (found - planted.transpose(-1, -2)).abs().max() < 1e-10
    back = permask.rotate_model(turned, {site.name: found}, graph)
    for k, v in model.state_dict().items():
        assert (back.state_dict()[k] - v).abs().max() < 1e-12, k


@pytest.mark.parametrize("scale, sites", [(0.5, 1), ("div", 1), ("gain", 0)])
def test_a_query_scaled_by_a_number_keeps_its_site_and_by_a_gain_does_not(scale, sites):
    """OPT scales its query after the projection: a number commutes with every head's map, so
    the query/key site stands and a random map keeps the function; a gain per channel does not
    commute, so there is no site (the value site stays)."""
    model, x, graph = _net(4, 2, 3, scale=scale)
    assert len(permask.query_key_sites(graph)) == sites
    assert len(permask.value_sites(graph)) == 1
    maps = permask.random_rotation(graph, torch.Generator().manual_seed(2))
    turned = permask.rotate_model(model, maps, graph)
    assert rel_err(model(x), turned(x)) < 1e-12
    if sites:
        (site,) = permask.query_key_sites(graph)
        assert (turned.q.weight - model.q.weight).abs().max() > 1e-3
        a, b = dict(model.named_parameters()), dict(turned.named_parameters())
        found = match_query_keys(a, b, site)
        assert (found - maps[site.name].transpose(-1, -2)).abs().max() < 1e-10


@pytest.mark.parametrize("leak", ["value", "output", "query"])
def test_a_value_query_or_output_read_elsewhere_is_not_a_site(leak):
    model, x, graph = _net(4, 2, 3, leak)
    assert bool(permask.value_sites(graph)) == (leak == "query")
    assert bool(permask.query_key_sites(graph)) == (leak != "query")


def test_bad_head_maps_are_refused_with_the_fix():
    model, x, graph = _net(4, 2, 3)
    (site,) = permask.value_sites(graph)
    good = permask.random_rotation(graph, torch.Generator().manual_seed(0))[site.name]
    with pytest.raises(ValueError, match="not orthogonal per head"):
        permask.rotate_model(model, {site.name: 2 * good}, graph)
    with pytest.raises(ValueError, match=r"needs \(2, 3, 3\)"):
        permask.rotate_model(model, {site.name: good[:1]}, graph)
    with pytest.raises(ValueError, match="no value or query/key site"):
        permask.rotate_model(model, {"value:nope": good}, graph)


def _causal_lm(family, **config):
    """A tiny Hugging Face causal LM of ``family`` (float64, eval), its graph and its logits."""
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.for_model(family, vocab_size=100, **config)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval().double()
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = permask.trace(model, {"input_ids": ids})
    return model, graph, lambda m: m(input_ids=ids).logits


def _gpt2():
    return _causal_lm("gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=64)


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
def test_fused_qkv_heads_turn_exactly_and_are_recovered(build, where):
    """Values, queries and keys that are parts of a fused projection: GPT-2's Conv1D split into
    q, k, v (the rows are the weight's columns; the output is Conv1D too) and timm's qkv linear
    reshaped to (3, heads, d). Random maps keep the function (float64); each site moves only its
    own rows; Procrustes by the weights recovers the maps."""
    model, graph, run = build()
    values, keys = permask.value_sites(graph), permask.query_key_sites(graph)
    assert len(values) == len(keys) == 2
    first = values[0]
    assert (first.value, first.rows.axis, first.rows.start, first.out, first.out_axis) == where
    width = first.rows.heads * first.rows.head_dim
    assert (keys[0].query.weight, keys[0].query.start, keys[0].key.start) == (first.value, 0, width)
    drawn = permask.random_rotation(graph, torch.Generator().manual_seed(1))
    a = dict(model.named_parameters())
    for site, moved in ((first, 2), (keys[0], 0)):  # the third of the rows each site moves
        turned = permask.rotate_model(model, {site.name: drawn[site.name]}, graph)
        with torch.no_grad():
            assert rel_err(run(model), run(turned)) < 1e-12
        w = a[first.value].movedim(first.rows.axis, 0).reshape(3, width, -1)
        w2 = turned.get_parameter(first.value).movedim(first.rows.axis, 0).reshape(3, width, -1)
        changed = [bool((w[i] - w2[i]).abs().max() > 1e-3) for i in range(3)]
        assert changed == [i == moved or (moved == 0 and i == 1) for i in range(3)]
    maps = {s.name: drawn[s.name] for s in [*values, *keys]}
    turned = permask.rotate_model(model, maps, graph)
    with torch.no_grad():
        assert rel_err(run(model), run(turned)) < 1e-12
    b = dict(turned.named_parameters())
    for site in values:
        assert (match_values(a, b, site) - maps[site.name].transpose(-1, -2)).abs().max() < 1e-10
    for site in keys:
        found = match_query_keys(a, b, site)
        assert (found - maps[site.name].transpose(-1, -2)).abs().max() < 1e-10


def test_opt_scaled_queries_are_query_key_sites():
    """Hugging Face's OPT multiplies the query by a number after q_proj: each layer is a
    query/key site, and random maps of those sites keep the logits (float64)."""
    model, graph, run = _causal_lm(
        "opt", hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=32, max_position_embeddings=64,
    )  # fmt: skip
    sites = permask.query_key_sites(graph)
    assert [s.query.weight for s in sites] == [
        f"model.decoder.layers.{i}.self_attn.q_proj.weight" for i in range(2)
    ]
    drawn = permask.random_rotation(graph, torch.Generator().manual_seed(1))
    turned = permask.rotate_model(model, {s.name: drawn[s.name] for s in sites}, graph)
    q = "model.decoder.layers.0.self_attn.q_proj.weight"
    assert (turned.get_parameter(q) - model.get_parameter(q)).abs().max() > 1e-3
    with torch.no_grad():
        assert rel_err(run(model), run(turned)) < 1e-12


@settings(max_examples=15, deadline=None)
@given(**HEADS)
@example(kv_heads=3, repeat=2, d=1, seed=138)  # one-dim heads: their maps are signs
def test_whole_heads_are_matched_whatever_their_maps(kv_heads, repeat, d, seed):
    """A planted permutation of whole key/value heads, and of the query heads sharing each, is
    found under random maps of every head (value and query/key): the heads' scores do not
    depend on the maps, nor on the order of the query heads sharing a key/value head."""
    assume(kv_heads > 1)
    model, x, graph = _net(kv_heads * repeat, kv_heads, d, seed=seed % 7)
    pi = permask.random_permutation(graph, torch.Generator().manual_seed(seed))
    maps = permask.random_rotation(graph, torch.Generator().manual_seed(seed + 1))
    b = permask.rotate_model(permask.permute_model(model, pi, graph), maps, graph)
    found = match_heads(model, b, graph)
    (kv,) = [g for g in found if any(m.tensor == "k.weight" for m in graph.groups[g].members)]
    assert graph.groups[kv].size == kv_heads and torch.equal(found[kv], pi[kv])
    # the query heads sharing a key head: matched too, beside the key heads as matched
    others = set(found) - {kv}
    assert len(others) == (repeat > 1)
    assert all(torch.equal(found[g], pi[g]) for g in others)


@settings(max_examples=15, deadline=None)
@given(kv_heads=st.sampled_from([1, 2, 3]), repeat=st.sampled_from([1, 2, 3]),
       d=st.integers(1, 4), seed=st.integers(0, 2**16))  # fmt: skip
def test_merging_finds_every_head_group_whatever_their_maps(kv_heads, repeat, d, seed):
    """Merging the model with a copy permuted in every group (key/value heads, the query heads
    sharing each, the dims inside heads) and turned by random maps gives its function back."""
    model, x, graph = _net(kv_heads * repeat, kv_heads, d, seed=seed % 7)
    pi = permask.random_permutation(graph, torch.Generator().manual_seed(seed))
    maps = permask.random_rotation(graph, torch.Generator().manual_seed(seed + 1))
    b = permask.rotate_model(permask.permute_model(model, pi, graph), maps, graph)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no residual map: the sites' maps only
        merged = permask.merge([model, b], method="weight", graph=graph, orthogonal="weight")
    assert rel_err(model(x), merged(x)) < 1e-9


def test_whole_heads_under_rope_are_matched_whatever_their_planes():
    """The same on a Hugging Face Llama (GQA, RoPE; 4 key/value heads): its key/value heads
    permuted, their frequency planes and values turned at random, the rest in place (the
    scores read it aligned, as merging's rounds have it)."""
    model, graph, _ = _causal_lm(
        "llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64,
    )  # fmt: skip
    assert len(permask.rope_sites(graph)) == len(permask.value_sites(graph)) == 2
    for seed in range(3):
        drawn = permask.random_permutation(graph, torch.Generator().manual_seed(seed))
        heads = [g for g in drawn if g.endswith("q_proj.weight:0.0")]  # key/value heads
        pi = permask.Permutation({g: drawn[g] for g in heads})
        maps = permask.random_rotation(graph, torch.Generator().manual_seed(seed + 10))
        maps = {k: m for k, m in maps.items() if k.startswith(("rope:", "value:"))}
        b = permask.rotate_model(permask.permute_model(model, pi, graph), maps, graph)
        found = match_heads(model, b, graph)
        assert set(pi) <= set(found) and len(pi) == 2
        assert all(torch.equal(found[g], pi[g]) for g in pi)
        repeats = set(found) - set(pi)  # the query heads sharing each key/value head: in place
        assert len(repeats) == 2 and all(torch.equal(found[g], torch.arange(2)) for g in repeats)


def test_within_head_groups_are_left_to_the_maps_when_merging():
    """The permutation groups inside each head (q/k dims, v dims) are included in the per-head
    maps, so merging's rounds leave them out; the groups of whole heads are not. Merging the
    model with a copy whose heads are permuted and turned gives the model's function back (the
    heads matched up to their maps: weight matching, reading the scrambled entries, pairs
    these wrongly)."""
    model, x, graph = _net(4, 2, 3)
    within = within_heads(graph)
    assert within and all(graph.groups[g].size == 3 for g in within)
    assert {g.name for g in graph if g.size == 2}.isdisjoint(within)  # kv heads, query repeats
    heads = {g.name for g in graph if g.size == 2 and g.name.startswith("q.")}
    pi = permask.random_permutation(graph, torch.Generator().manual_seed(3))
    pi = permask.Permutation({g: pi[g] for g in heads})
    assert not pi.is_identity()
    maps = permask.random_rotation(graph, torch.Generator().manual_seed(1))
    b = permask.rotate_model(permask.permute_model(model, pi, graph), maps, graph)
    assert rel_err(model(x), b(x)) < 1e-12
    plain = permask.merge([model, b], method="weight", graph=graph)
    assert rel_err(model(x), plain(x)) > 0.05
    with pytest.warns(UserWarning, match="the maps of its 2 attention sites only"):
        merged = permask.merge([model, b], method="weight", graph=graph, orthogonal="weight")
    assert rel_err(model(x), merged(x)) < 1e-12


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("seed", range(7))
def test_query_heads_sharing_a_key_head_are_matched_up_to_its_map(swap, seed):
    """GQA's query heads that read one key/value head are matched up to that head's maps, as
    whole heads are. With one-dim heads the maps are signs: merging the model with a copy whose
    key/value head is negated (its two query heads swapped or not) gave it back for 8 of these
    14 draws when weight matching paired the query heads."""
    model, x, graph = _net(2, 1, 1, seed=seed)
    (repeats,) = [g.name for g in graph if g.size == 2]
    pi = permask.Permutation({repeats: torch.tensor([1, 0] if swap else [0, 1])})
    sites = [*permask.value_sites(graph), *permask.query_key_sites(graph)]
    maps = {s.name: -torch.ones(1, 1, 1, dtype=torch.float64) for s in sites}
    b = permask.rotate_model(permask.permute_model(model, pi, graph), maps, graph)
    assert rel_err(model(x), b(x)) < 1e-12
    with pytest.warns(UserWarning, match="the maps of its 2 attention sites only"):
        merged = permask.merge([model, b], method="weight", graph=graph, orthogonal="weight")
    assert rel_err(model(x), merged(x)) < 1e-12


class Leaky(nn.Module):
    """Attention written in ways that read a query, key or value (or the output) a second time,
    or reshape it other than by (heads, d): none of these may be a site that the leak touches."""

    def __init__(self, mode, heads=2, d=3):
        super().__init__()
        self.mode, self.heads, self.d, c = mode, heads, d, heads * d
        self.qkv, self.o, self.w = nn.Linear(c, 3 * c), nn.Linear(c, c), nn.Linear(c, c)

    def forward(self, x):
        b, t, _ = x.shape
        c, extra = self.heads * self.d, 0
        if self.mode.startswith("unbind"):
            u = self.qkv(x).reshape(b, t, 3, self.heads, self.d).permute(2, 0, 3, 1, 4).unbind(0)
            q, k, v = u[0], u[1], u[2]
            if self.mode == "unbind_twice":
                extra = u[2].sum((1, 3)).mean(-1)[:, None, None]
        else:
            parts = self.qkv(x).split(c, -1)
            q, k, v = (p.view(b, -1 if self.mode == "minus_one" else t, self.heads, self.d)
                       .transpose(1, 2) for p in parts)  # fmt: skip
            if self.mode == "split_twice":
                extra = parts[2].sum(-1, keepdim=True)
            elif self.mode == "split_whole":
                extra = torch.cat(parts, -1)[..., :1]
            elif self.mode == "value_mT":
                extra = v.mT.sum((1, 2))[:, None, :1]
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        y = y.reshape(b, -1, c // 2) if self.mode == "minus_one" else y.reshape(b, t, c)
        if self.mode == "type_as":
            y = self.w(x).type_as(y)
        if self.mode == "minus_one":
            return self.o(torch.cat([y, y], -1)).sum(1, keepdim=True) + x
        return self.o(y) + extra


@pytest.mark.parametrize(
    "mode, sites",
    [
        ("split", ["value", "qk"]),  # the fused split, read once: both sites
        ("unbind", ["value", "qk"]),
        ("split_twice", ["qk"]),  # the value part indexed twice
        ("split_whole", []),  # every part read as a whole
        ("unbind_twice", ["qk"]),
        ("value_mT", ["qk"]),  # the value read through .mT
        ("type_as", ["qk"]),  # the output projection reads other.type_as(y)
        ("minus_one", ["qk"]),  # the output reshaped with -1 into no (heads, d) merge
    ],
)  # fmt: skip
def test_reads_elsewhere_and_unproved_reshapes_are_not_sites(mode, sites):
    torch.manual_seed(0)
    model = Leaky(mode).double().eval()
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    graph = permask.trace(model, x)
    found = [s.name.split(":")[0] for s in permask.graph.head_sites(graph)]
    assert found == sites
    drawn = permask.random_rotation(graph, torch.Generator().manual_seed(1))
    for name in [s.name for s in permask.graph.head_sites(graph)]:
        turned = permask.rotate_model(model, {name: drawn[name]}, graph)
        assert rel_err(model(x), turned(x)) < 1e-12


def test_within_heads_counts_only_the_rows_a_site_turns():
    """A fused qkv whose query is also read elsewhere: only the value site stays, so the groups
    inside the q/k heads are not the maps' (merging keeps permuting them); the v ones are."""
    torch.manual_seed(0)
    model = Leaky("split").double().eval()
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    graph = permask.trace(model, x)
    both = within_heads(graph)
    only_values = within_heads(graph, permask.value_sites(graph))
    assert len(both) == 2 and len(only_values) == 1 and only_values < both


class Unmerged(nn.Module):
    """Sizes written as -1 under torch.fx (no traced shapes): the output reshape makes
    [B, 2T, 4] rows of half a position's heads, so the value site cannot be proved."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(8, 4)
        self.o = nn.Linear(4, 8)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, -1, 4, 2).transpose(1, 2)
        k = self.k(x).view(b, -1, 2, 2).transpose(1, 2)
        v = self.v(x).view(b, -1, 2, 2).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.o(y.transpose(1, 2).reshape(b, -1, 4)).reshape(b, t, 16)


def test_a_merge_written_with_minus_one_is_not_a_value_site_under_fx():
    model = Unmerged().double().eval()
    graph = permask.trace(model, torch.randn(2, 3, 8, dtype=torch.float64))
    assert graph.frontend == "fx" and permask.value_sites(graph) == []
