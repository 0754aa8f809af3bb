"""Orthogonal maps learned on the midpoint's loss (permask/match/learned_maps.py): every learned
map keeps the turned model's function exactly (float64, random draws and the tiny Llama and
ViT), learning lowers the midpoint's loss below Procrustes' on the batches it learned from, and
bad input is refused with the fix."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from equivariance import rel_err
from hypothesis import given, settings
from hypothesis import strategies as st
from test_rotate import PreNorm, _hf, _randomise_norms, _vit

import permask
from permask.match.learned_maps import learn_rotations, maps_of
from permask.match.midpoint import batch_loss, midpoint_modes
from permask.merging import turned_onto


def _data(seed: int, n: int = 4) -> list:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16 * n, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (16 * n,), generator=gen)
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, 16 * n, 16)]


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), layer_norm=st.booleans())
def test_learned_maps_keep_the_function(seed, layer_norm):
    """Two independent pre-norm models (LayerNorm: maps that keep the all-ones direction): B
    turned by the learned maps computes B's function, and the maps moved."""
    norm = nn.LayerNorm if layer_norm else nn.RMSNorm
    torch.manual_seed(seed)
    a, b = (_randomise_norms(PreNorm(norm), seed + i).double() for i in range(2))
    data = _data(seed)
    graph = permask.trace(a, data[0][0])
    a, b = permask.fold_norms(a, graph), permask.fold_norms(b, graph)
    maps = learn_rotations(a, b, graph, data * 3)
    o = maps["inp.weight:0"]
    eye = torch.eye(6, dtype=torch.float64)
    assert o.dtype == torch.float64 and (o.T @ o - eye).abs().max() < 1e-12
    assert (o - eye).abs().max() > 1e-3
    if layer_norm:
        assert (o.sum(1) - 1).abs().max() < 1e-12
    turned = permask.rotate_model(b, maps, graph)
    x = torch.cat([x for x, _ in data])
    assert rel_err(b(x), turned(x)) < 1e-12


def _midpoint_loss(a: nn.Module, b: nn.Module, data: list) -> float:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    mid = {n: (pa[n].detach() + pb[n].detach()) / 2 for n in pa}
    with torch.no_grad(), midpoint_modes(a):
        return sum(float(batch_loss(a, mid, batch, "cpu")) for batch in data) / len(data)


def test_learning_lowers_the_midpoint_loss_below_procrustes():
    """On two independently trained models, the maps learned on the batches leave a lower
    midpoint loss there than Procrustes' maps alone (orthogonal="weight"), which the learning
    starts from; so does ``merge`` with them (its average is that midpoint)."""
    torch.manual_seed(0)
    data = _data(0, n=8)
    teacher = PreNorm().double()
    data = [(x, teacher(x).argmax(-1)) for x, _ in data]
    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        m = _randomise_norms(PreNorm(), seed).double()
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        for _ in range(30):
            for x, y in data:
                opt.zero_grad()
                nn.functional.cross_entropy(m(x), y).backward()
                opt.step()
        models.append(m.eval())
    graph = permask.trace(models[0], data[0][0])
    b0, a0 = turned_onto(models[::-1], 0, graph, data, orthogonal="weight", method="weight")
    b1, a1 = turned_onto(models[::-1], 0, graph, data * 5, orthogonal="learned", method="weight")
    before, after = _midpoint_loss(b0, a0, data), _midpoint_loss(b1, a1, data)
    assert after < 0.7 * before, (before, after)
    x = torch.cat([x for x, _ in data])
    assert rel_err(models[0](x), a1(x)) < 1e-12
    merged = [permask.merge(models[::-1], data * 5, method="activation", graph=graph,
                            orthogonal=how) for how in ("weight", "learned")]  # fmt: skip
    with torch.no_grad():
        losses = [float(nn.functional.cross_entropy(m(x), torch.cat([y for _, y in data])))
                  for m in merged]  # fmt: skip
    assert losses[1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("kind", ["llama", "vit"])
def test_learned_maps_keep_llama_and_vit_functions(kind):
    """The residual stream, RoPE's planes and the value heads (a GQA Llama), the all-ones-keeping
    stream (a timm ViT): learned on a few batches, the maps keep the turned model's function.
    transformers' RMSNorm normalises in float32 inside a float64 model, hence 1e-6 there."""
    if kind == "llama":
        model, graph, ids = _hf(kind, num_key_value_heads=2, tie_word_embeddings=False)
        data = [{"input_ids": ids, "labels": ids}] * 2
        run = lambda m: m(input_ids=ids).logits  # noqa: E731
        tol = 1e-6
    else:
        model, graph, x = _vit(4)
        data, tol = [(x, torch.arange(4))] * 2, 1e-12
        run = lambda m: m(x)  # noqa: E731
    other = permask.rotate_model(permask.fold_norms(model, graph), permask.random_rotation(
        graph, torch.Generator().manual_seed(0)), graph)  # fmt: skip
    folded = permask.fold_norms(model, graph)
    maps = learn_rotations(folded, other, graph, data)
    assert len(maps) == 5  # the stream, each RoPE and value site (Llama), value and q/k (ViT)
    turned = permask.rotate_model(other, maps, graph)
    with torch.no_grad():
        assert rel_err(run(other), run(turned)) < tol


def test_bad_input_is_refused_with_the_fix():
    torch.manual_seed(0)
    model = PreNorm().double()
    data = _data(0)
    graph = permask.trace(model, data[0][0])
    folded = permask.fold_norms(model, graph)
    with pytest.raises(ValueError, match="yielded no batches"):
        learn_rotations(folded, folded, graph, [])
    with pytest.raises(ValueError, match="needs a loader; or 'weight'"):
        permask.merge([model, model], method="weight", graph=graph, orthogonal="learned")
    with pytest.raises(ValueError, match="needs a loader"):
        turned_onto([model, model], 0, graph, orthogonal="learned")
    with pytest.raises(ValueError, match="'learned'"):
        permask.merge([model, model], data, graph=graph, orthogonal="learnt")
    mlp = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    assert learn_rotations(mlp, mlp, permask.trace(mlp, data[0][0]), data) == {}


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(1, 6))
def test_maps_of_free_parameters_are_orthogonal_and_zeros_the_identity(seed, k):
    """``maps_of``, the parametrisation the learning steps (and benchmarks/beyond_orthogonal.py
    reuses): any generator gives an orthogonal map, any angle a plane rotation, zeros give the
    identity."""
    gen = torch.Generator().manual_seed(seed)
    free = {"g": torch.randn(2, k, k, generator=gen, dtype=torch.float64),
            "rope:s": torch.randn(2, k, generator=gen, dtype=torch.float64)}  # fmt: skip
    for params in (free, {n: torch.zeros_like(x) for n, x in free.items()}):
        maps = maps_of(params, {})
        assert maps["g"].shape == (2, k, k) and maps["rope:s"].shape == (2, k, 2, 2)
        for m in maps.values():
            eye = torch.eye(m.shape[-1], dtype=torch.float64)
            assert (m @ m.transpose(-1, -2) - eye).abs().max() < 1e-12
    assert (maps["g"] - torch.eye(k, dtype=torch.float64)).abs().max() == 0
    assert torch.equal(maps["rope:s"], torch.eye(2, dtype=torch.float64).expand(2, k, 2, 2))
