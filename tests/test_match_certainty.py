"""How sure an alignment is: margins certify a planted permutation, ties are named."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment
from torch import nn

import permask
from permask.match import align
from permask.match.assign import OpenMargin, assign, conditional, margin
from permask.match.by_activation import observe
from permask.match.points import plan_points


def test_margin_certifies_a_strict_favourite_and_counts_ties():
    score = torch.tensor([[3.0, 0.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.0, 1.0]])
    assert margin(score, torch.arange(3)) == (0.5 / 3.0, 0)  # column 2: 1 over 0.5, over max 3
    tied = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    assert margin(tied, torch.arange(2)) == (0.0, 2)
    # the optimum of a trade-off: column 1's favourite (row 0) goes to column 0
    trade = torch.tensor([[5.0, 4.0], [0.0, 3.0]])
    m, ties = margin(trade, torch.tensor([0, 1]))
    assert m < 0 and ties == 0


def _pair(seed: int, noise: float = 1e-3):
    torch.manual_seed(seed)
    a = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    graph = permask.trace(a, torch.randn(1, 8))
    pi = permask.random_permutation(graph, torch.Generator().manual_seed(seed))
    b = permask.permute_model(a, pi, graph)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(noise * p.std() * torch.randn_like(p))
    return a, b, graph, pi


@pytest.mark.outcome
def test_a_planted_permutation_is_certified_by_both_methods():
    a, b, graph, pi = _pair(0)
    data = [(torch.randn(64, 8), torch.zeros(64)) for _ in range(2)]
    for method in ("weight", "activation"):
        got, info = align(a, b, data, method=method, graph=graph, return_info=True)
        assert got == pi and set(info.margins) == set(pi), method
        live = [g for g in pi if g not in {k for key in info.constant for k in key.split(" x ")}]
        assert all(info.margins[g] > 0 for g in live), (method, info.margins)


def test_unrelated_models_trade_off_and_equal_weights_are_named(caplog):
    a, _, graph, _ = _pair(0)
    torch.manual_seed(1)
    c = type(a)(*[type(m)(m.in_features, m.out_features) if isinstance(m, nn.Linear) else m
                  for m in a])  # fmt: skip
    _, info = align(a, c, method="weight", graph=graph, return_info=True)
    assert min(info.margins.values()) < 0  # no certificate between independent inits
    twin = permask.permute_model(a, permask.Permutation.identity(graph), graph)
    with torch.no_grad():  # hidden units 0 and 1 of the first layer made identical in both
        for m in (a, twin):
            m[0].weight[1], m[0].bias[1], m[2].weight[:, 1] = (
                m[0].weight[0],
                m[0].bias[0],
                m[2].weight[:, 0],
            )
    with caplog.at_level("WARNING", logger="permask.match"):
        _, info = align(a, twin, method="weight", graph=graph, return_info=True)
    assert info.ties == {"0.weight:0": 2}
    assert "1 group(s) have elements whose best partners tie" in caplog.text
    assert "'0.weight:0': 2 elements" in caplog.text


def test_conditional_scores_hold_the_other_groups_of_a_nesting_at_their_assignment():
    g = torch.Generator().manual_seed(0)
    sizes = {"o": 3, "m": 2, "i": 4}
    perms = {k: torch.randperm(n, generator=g) for k, n in sizes.items()}
    t = torch.randn(3, 2, 4, 3, 2, 4, dtype=torch.float64, generator=g)  # chain (o, m, i)
    got = conditional({("o", "m", "i"): t.reshape(24, 24)}, sizes, perms)
    po, pm, pi = perms["o"], perms["m"], perms["i"]
    want_o = sum(t[:, pm[b], pi[c], :, b, c] for b in range(2) for c in range(4))
    want_m = sum(t[po[a], :, pi[c], a, :, c] for a in range(3) for c in range(4))
    want_i = sum(t[po[a], pm[b], :, a, b, :] for a in range(3) for b in range(2))
    for name, want in (("o", want_o), ("m", want_m), ("i", want_i)):
        torch.testing.assert_close(got[name], want, rtol=1e-12, atol=1e-12)


def test_activation_matching_certifies_the_groups_of_blocks_x_within():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 24, 3, padding=1, groups=4), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5))  # fmt: skip
    graph = permask.trace(model, torch.randn(1, 3, 8, 8))
    pi = permask.random_permutation(graph, torch.Generator().manual_seed(1))
    b = permask.permute_model(model, pi, graph)
    data = [(torch.randn(32, 3, 8, 8), torch.zeros(32)) for _ in range(2)]
    got, info = align(model, b, data, graph=graph, return_info=True)
    assert got == pi and set(info.margins) == set(pi) and len(pi) == 3  # blocks, two withins
    assert all(m > 0 for m in info.margins.values()), info.margins


@given(st.integers(2, 7), st.integers(0, 2**31 - 1), st.floats(0.0, 1.0))
def test_open_margin_is_the_margin_of_the_whole_score(n, seed, share):
    """Kept only for its open columns, a score gives the margin and ties of the whole matrix
    for any assignment that differs from the first only there (ties drawn in by rounding)."""
    g = torch.Generator().manual_seed(seed)
    score = (torch.randn(n, n, generator=g, dtype=torch.float64) * 4).round() / 4
    p = torch.randperm(n, generator=g)
    open_ = (torch.rand(n, generator=g) < share).nonzero().flatten()
    kept = OpenMargin(score, p, open_)
    for _ in range(3):
        q = p.clone()
        q[open_] = p[open_][torch.randperm(len(open_), generator=g)]
        assert kept.margin(q) == margin(score, q)


def test_final_margins_after_the_weights_reorder_dead_units():
    """Dead units re-matched by the weights after the data's assignment: the margins reported
    are those of the correlations at the final permutation."""
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 5)) for _ in range(2)]
    for net in nets:
        with torch.no_grad():
            net[0].bias[:6] = -100.0  # six units that never fire
    data = [torch.randn(32, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    graph = permask.trace(nets[0], data[0])
    pi, info = align(*nets, data, graph=graph, return_info=True)
    stats, _, _ = observe(*nets, graph, plan_points(graph), data, torch.device("cpu"))
    (group,) = pi.keys()
    fresh = margin(stats.scores()[(group,)], pi[group])
    assert info.constant and info.margins[group] == fresh[0] and info.ties.get(group, 0) == fresh[1]


@given(st.integers(1, 9), st.integers(0, 2**31 - 1))
def test_assign_finds_the_optimum_and_leaves_the_scores_as_they_were(n, seed):
    """A float64 score is solved in its own memory (negated and restored): the scores come back
    bit for bit, and the assignment's total is scipy's optimum; float32 scores are copied."""
    g = torch.Generator().manual_seed(seed)
    for dtype in (torch.float64, torch.float32):
        score = torch.randn(n, n, generator=g, dtype=dtype)
        before = score.clone()
        p = assign({("g",): score}, {"g": n})["g"]
        assert torch.equal(score, before) and sorted(p.tolist()) == list(range(n))
        rows, cols = linear_sum_assignment(before.double().numpy(), maximize=True)
        best = before.double().numpy()[rows, cols].sum()
        assert float(before.double()[p, torch.arange(n)].sum()) == pytest.approx(best, abs=1e-9)
