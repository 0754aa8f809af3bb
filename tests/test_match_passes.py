"""Activation matching under ``max_stats_memory``: the groups split into several passes over the
data give the same permutation, margins and diagnostics as one pass (an MLP with dead units,
whose pairs the weights re-order; a grouped-query Llama, whose heads are solved jointly); a
budget too small for one group, or a loader that can be read once, is refused by name."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import permask
from permask.match.passes import (
    balanced,
    components,
    parse_bytes,
    plan_bytes,
    restricted,
    split_plan,
)
from permask.match.points import plan_points


def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(),
                        nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))  # fmt: skip
    with torch.no_grad():
        net[0].bias[:4] = -100.0  # four units that never fire: ordered by the weights
    return net


def _same(one, many) -> None:
    (pi1, info1), (pi2, info2) = one, many
    assert info1.passes == 1 and info2.passes > 1
    assert pi1.keys() == pi2.keys()
    assert all(torch.equal(pi1[g], pi2[g]) for g in pi1)
    assert info2.margins == info1.margins and info2.ties == info1.ties
    assert info2.constant == info1.constant and info2.observations == info1.observations
    assert info2.stats_bytes < info1.stats_bytes


def _smallest_budget(graph) -> int:
    plan = plan_points(graph)
    budget = max(plan_bytes(p) for p in split_plan(plan, plan_bytes(plan) - 1))
    assert len(split_plan(plan, budget)) > 1
    return budget


def test_passes_give_the_permutation_of_one_pass_mlp():
    data = [torch.randn(32, 6, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    a, b = _mlp(0), _mlp(1)
    graph = permask.trace(a, data[0])
    budget = _smallest_budget(graph)
    kw = dict(graph=graph, return_info=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = permask.align(a, b, data, **kw)
        many = permask.align(a, b, data, max_stats_memory=budget, **kw)
    _same(one, many)
    assert one[1].constant  # the dead units were there to re-order


def test_passes_give_the_permutation_of_one_pass_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.for_model(
        "llama", hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=32,
    )  # fmt: skip
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(transformers.AutoModelForCausalLM.from_config(config).eval())
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 64, (4, 16), generator=g) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = permask.trace(models[0], data[0])
        budget = _smallest_budget(graph)
        one = permask.align(*models, data, graph=graph, return_info=True)
        many = permask.align(*models, data, graph=graph, max_stats_memory=budget,
                             return_info=True)  # fmt: skip
    _same(one, many)


@given(st.lists(st.integers(1, 20), min_size=1, max_size=8), st.integers(0, 30))
def test_passes_are_as_few_as_fit_and_even(sizes, extra):
    """Against every way of cutting the sizes in order: no cut under the cap has fewer runs,
    and none with as few runs has a smaller largest run (the peak memory of the passes)."""
    cap = max(sizes) + extra
    runs = balanced(sizes, cap)
    assert [i for run in runs for i in run] == list(range(len(sizes)))
    peak = max(sum(sizes[i] for i in run) for run in runs)
    assert peak <= cap
    for k in range(len(sizes)):
        for cuts in itertools.combinations(range(1, len(sizes)), k):
            bounds = (0, *cuts, len(sizes))
            most = max(sum(sizes[a:b]) for a, b in zip(bounds, bounds[1:]))
            if most <= cap:
                assert len(runs) <= k + 1
                assert len(runs) < k + 1 or peak <= most


def test_passes_are_even_on_a_plan():
    """An MLP's groups under a budget just below the whole plan: two passes, each group in one,
    the larger pass the smallest any cut of the groups in order into two gives."""
    plan = plan_points(permask.trace(_mlp(0), torch.randn(2, 6)))
    sizes = [plan_bytes(restricted(plan, c)) for c in components(plan)]
    passes = split_plan(plan, plan_bytes(plan) - 1)
    assert len(passes) == 2 and sum(plan_bytes(p) for p in passes) == plan_bytes(plan)
    best = min(max(sum(sizes[:k]), sum(sizes[k:])) for k in range(1, len(sizes)))
    assert max(plan_bytes(p) for p in passes) == best < plan_bytes(plan) - 1


def test_components_keep_nested_groups_together():
    """A grouped conv's blocks and within-block orders are one component, in one pass."""
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=4, padding=1),
                        nn.ReLU(), nn.Conv2d(8, 2, 1))  # fmt: skip
    plan = plan_points(permask.trace(net, torch.randn(1, 3, 6, 6)))
    comps = components(plan)
    nested = [c for c in comps if len(c) > 1]
    assert nested and all(
        any(set(u.groups) <= c for c in comps) for p in plan.points for u in p.units
    )
    for sub in split_plan(plan, max(plan_bytes(p) for p in split_plan(plan, 1 << 40))):
        for c in nested:
            seen = {g for p in sub.points for u in p.units for g in u.groups}
            assert c <= seen or not c & seen


def test_refusals():
    data = [torch.randn(8, 6) for _ in range(2)]
    a, b = _mlp(0), _mlp(1)
    graph = permask.trace(a, data[0])
    with pytest.raises(ValueError, match=r"group\(s\) .* alone, more than max_stats_memory"):
        permask.align(a, b, data, graph=graph, max_stats_memory=100)
    budget = _smallest_budget(graph)
    with pytest.raises(ValueError, match="iterator that can be read once"):
        permask.align(a, b, iter(data), graph=graph, max_stats_memory=budget)
    with pytest.raises(ValueError, match="not a number of bytes"):
        permask.align(a, b, data, graph=graph, max_stats_memory="4 gigs")
    assert parse_bytes("1.5GiB") == 3 * 2**29 and parse_bytes(" 10kb ") == 10_000
    with pytest.raises(ValueError, match="positive"):
        parse_bytes(0)


def test_float32_statistics_halve_the_memory_and_keep_the_permutation():
    """float32 sums (shifted by the first batch's means, as float64's): the same permutation
    and constant units as float64 on the MLP, half the bytes, so a budget that needs two
    float64 passes (or more than the largest group's float64 statistics) needs one; the
    margins agree to float32 rounding."""
    data = [torch.randn(32, 6, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    a, b = _mlp(0), _mlp(1)
    graph = permask.trace(a, data[0])
    plan = plan_points(graph)
    assert plan_bytes(plan, 4) * 2 == plan_bytes(plan)
    kw = dict(graph=graph, return_info=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pi64, info64 = permask.align(a, b, data, **kw)
        pi32, info32 = permask.align(a, b, data, stats_dtype="float32", **kw)
        budget = plan_bytes(plan, 4)
        _, squeezed = permask.align(a, b, data, stats_dtype="float32", max_stats_memory=budget,
                                    **kw)  # fmt: skip
    assert all(torch.equal(pi64[g], pi32[g]) for g in pi64)
    assert info32.constant == info64.constant and info32.stats_bytes * 2 == info64.stats_bytes
    for g, m in info64.margins.items():
        assert info32.margins[g] == pytest.approx(m, rel=1e-4, abs=1e-5)
    assert squeezed.passes == 1 and plan_bytes(plan) > budget  # float64 would not fit
    with pytest.raises(ValueError, match="stats_dtype must be"):
        permask.align(a, b, data, stats_dtype="float16", **kw)
