"""``permask.match.weight._Descent``: the coordinate-descent state behind ``weight_matching``."""

import doctest

import pytest
import torch
import torch.nn as nn

import permask
from permask.match import weight as wm
from permask.match import weight_matching


def _grouped():
    """GroupNorm blocks x within and grouped convs sharing the blocks: joint moves happen."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.GroupNorm(4, 16), nn.ReLU(),
        nn.Conv2d(16, 24, 3, groups=4), nn.ReLU(), nn.Flatten(), nn.Linear(24 * 4 * 4, 5),
    )  # fmt: skip
    return model, permask.trace(model, torch.randn(1, 3, 8, 8))


def _unrelated(model, seed):
    gen = torch.Generator().manual_seed(seed)
    pa = {n: p.detach() for n, p in model.named_parameters()}
    pb = {n: torch.randn(p.shape, generator=gen) * p.abs().mean() for n, p in pa.items()}
    return pa, pb


def test_docstring_examples_run():
    assert doctest.testmod(wm, raise_on_error=True).attempted >= 10


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stepping_the_object_by_hand_is_weight_matching(seed):
    """``sweep()`` called outside ``settle()`` (each LAP solved in place, no thread) until
    nothing is stale gives ``weight_matching``'s permutations, objective and sweep count."""
    model, graph = _grouped()
    pa, pb = _unrelated(model, seed)
    want = weight_matching(pa, pb, graph, seed=seed)
    d = wm._Descent(pa, pb, graph, seed=seed)
    assert d._joint  # the case exercises joint moves
    while d._stale or d._joint_stale:
        d.sweep()
    got = d.result()
    assert (got.iterations, got.objective) == (want.iterations, want.objective)
    assert all(torch.equal(got.perms[g], want.perms[g]) for g in want.perms)


def test_max_iter_caps_the_sweeps_across_settle_calls():
    model, graph = _grouped()
    pa, pb = _unrelated(model, 3)
    full = weight_matching(pa, pb, graph, seed=1)
    assert full.iterations >= 2
    d = wm._Descent(pa, pb, graph, seed=1)
    d.settle(1)
    assert d.iterations == 1
    d.settle()  # resumes where the first call stopped
    assert d.result().objective == full.objective and d.iterations == full.iterations


def test_low_precision_weights_are_held_as_they_are_and_scored_in_float32():
    """A bfloat16 pair gives the result of the same pair cast to float32 (the products are
    float32 either way), and the descent holds the bfloat16 tensors themselves, not copies."""
    model, graph = _grouped()
    pa, pb = _unrelated(model, 3)
    half_a = {n: t.to(torch.bfloat16) for n, t in pa.items()}
    half_b = {n: t.to(torch.bfloat16) for n, t in pb.items()}
    half = weight_matching(half_a, half_b, graph)
    full = weight_matching({n: t.float() for n, t in half_a.items()},
                           {n: t.float() for n, t in half_b.items()}, graph)  # fmt: skip
    assert all(torch.equal(half.perms[g], full.perms[g]) for g in full.perms)
    assert half.objective == full.objective and half.iterations == full.iterations
    d = wm._Descent(half_a, half_b, graph)
    assert all(d._wa[n].data_ptr() == half_a[n].data_ptr() for n in d._wa)
    assert all(d._wb[n].data_ptr() == half_b[n].data_ptr() for n in d._wb)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_computed_anew_at_each_visit_give_the_same_descent(seed):
    """Without running scores (big models: ``KEEP_SCORES_BYTES``) a group's scores are
    recomputed at each visit and freed after its LAP: the same permutations and sweeps, and
    the objective and margins up to float32 rounding of the sums' order."""
    model, graph = _grouped()
    pa, pb = _unrelated(model, seed)
    kept = weight_matching(pa, pb, graph, seed=seed, keep_scores=True)
    d = wm._Descent(pa, pb, graph, seed=seed, keep_scores=False)
    d.settle()
    assert not d._totals  # nothing held between visits
    anew = d.result()
    assert all(torch.equal(anew.perms[g], kept.perms[g]) for g in kept.perms)
    assert anew.iterations == kept.iterations
    assert anew.objective == pytest.approx(kept.objective, rel=1e-6)
    assert anew.margins.keys() == kept.margins.keys()
    for g, m in kept.margins.items():
        assert anew.margins[g] == pytest.approx(m, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_products_piece_by_piece_give_the_same_descent(seed, monkeypatch):
    """Tensors larger than ``PIECE_BYTES`` are multiplied slice by slice (an LLM's embedding
    would otherwise be copied whole to float32): the same permutations and sweeps, and the
    objective up to float32 rounding of the sums' order."""
    model, graph = _grouped()
    pa, pb = _unrelated(model, seed)
    whole = weight_matching(pa, pb, graph, seed=seed)
    monkeypatch.setattr(wm, "PIECE_BYTES", 64)  # a few positions per piece
    sliced = weight_matching(pa, pb, graph, seed=seed)
    assert all(torch.equal(sliced.perms[g], whole.perms[g]) for g in whole.perms)
    assert sliced.iterations == whole.iterations
    assert sliced.objective == pytest.approx(whole.objective, rel=1e-6)


def test_pieces_are_the_permuted_tensor_in_slices(monkeypatch):
    """``_pieces`` cut A (every axis moved) and B along one axis, each at most ``PIECE_BYTES``
    of float32 where a slice of one position fits."""
    monkeypatch.setattr(wm, "PIECE_BYTES", 4 * 3 * 5 * 2)
    a, b = torch.randn(7, 3, 5, dtype=torch.float64), torch.randn(7, 3, 5).bfloat16()
    idxs = [torch.randperm(7), None, torch.randperm(5)]
    pieces = list(wm._pieces(a, b, idxs, 0))
    assert [p.shape[0] for p, _ in pieces] == [2, 2, 2, 1]
    assert all(p.dtype == q.dtype == torch.float32 for p, q in pieces)
    assert torch.equal(torch.cat([p for p, _ in pieces]), a[idxs[0]][:, :, idxs[2]].float())
    assert torch.equal(torch.cat([q for _, q in pieces]), b.float())
