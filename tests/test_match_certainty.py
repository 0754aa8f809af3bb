"""How sure an alignment is: margins certify a planted permutation, ties are named."""

from __future__ import annotations

import torch
from torch import nn

import permask
from permask.match import align
from permask.match.assign import margin


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
    with caplog.at_level("WARNING", logger="permask.match.alignment"):
        _, info = align(a, twin, method="weight", graph=graph, return_info=True)
    assert info.ties == {"0.weight:0": 2}
    assert "1 group(s) have elements whose best partners tie" in caplog.text
    assert "'0.weight:0': 2 elements" in caplog.text
