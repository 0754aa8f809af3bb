"""LAP solvers: exact against brute force, rectangular, errors."""

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from permask.match import available_solvers, solve_lap
from permask.match.lap import optima


def _brute(cost: np.ndarray) -> float:
    n, m = cost.shape
    return max(
        sum(cost[i, c] for i, c in enumerate(cols)) for cols in itertools.permutations(range(m), n)
    )


@pytest.mark.parametrize("solver", available_solvers())
@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 5), extra=st.integers(0, 2), seed=st.integers(0, 2**31 - 1))
def test_optimal_against_brute_force(solver, n, extra, seed):
    cost = np.random.default_rng(seed).normal(size=(n, n + extra))
    cols = solve_lap(cost, maximize=True, solver=solver)
    assert len(cols) == n and len(set(cols.tolist())) == n
    assert cost[np.arange(n), cols.numpy()].sum() == pytest.approx(_brute(cost))
    low = solve_lap(cost, maximize=False, solver=solver)
    assert cost[np.arange(n), low.numpy()].sum() == pytest.approx(-_brute(-cost))


@pytest.mark.parametrize("shape", [(300, 300), (200, 260), (260, 200)])
def test_solvers_agree_on_the_optimum_of_larger_problems(shape):
    cost = np.random.default_rng(0).normal(size=shape)
    values = {}
    for solver in available_solvers():
        cols = solve_lap(cost, solver=solver).numpy()
        rows = (cols >= 0).nonzero()[0]
        assert len(rows) == min(shape) and len(set(cols[rows].tolist())) == len(rows)
        values[solver] = cost[rows, cols[rows]].sum()
    assert values == pytest.approx({s: values["scipy"] for s in values}, rel=1e-12)


@pytest.mark.parametrize("solver", available_solvers())
def test_more_rows_than_columns_leaves_rows_unassigned(solver):
    cost = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 0.0]])
    cols = solve_lap(cost, solver=solver)
    assert cols.tolist() == [-1, 1, 0]


def test_identity_recovered_from_tensor():
    p = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    score = torch.eye(64)[p] + 0.01 * torch.rand(64, 64)
    assert torch.equal(solve_lap(score), p)


def test_errors():
    with pytest.raises(ValueError, match="NaN"):
        solve_lap(np.array([[np.nan, 1.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="unknown LAP solver"):
        solve_lap(np.eye(2), solver="hungarian")
    with pytest.raises(ValueError, match="2-D"):
        solve_lap(np.ones(3))
    if "lapx" not in available_solvers():
        with pytest.raises(ImportError, match="lapx"):
            solve_lap(np.eye(2), solver="lapx")


@given(k=st.integers(1, 6), m=st.integers(1, 7), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=25, deadline=None)
def test_optima_are_the_optimal_values_of_each_block(k, m, seed):
    blocks = np.random.default_rng(seed).standard_normal((k, m, m))
    for block, value in zip(blocks, optima(blocks)):
        cols = solve_lap(block).numpy()
        assert value == pytest.approx(block[np.arange(m), cols].sum(), rel=1e-12)
    with pytest.raises(ValueError, match=r"\[k, m, m\]"):
        optima(blocks[:, :, :-1] if m > 1 else blocks[0])


@pytest.mark.parametrize("solver", available_solvers())
@pytest.mark.parametrize("kind", ["numpy64", "numpy32", "torch64", "torch32", "list"])
def test_the_callers_matrix_is_left_as_it_was(solver, kind):
    """Maximising negates the float64 copy in place only when that copy is the solver's own."""
    base = np.random.default_rng(0).normal(size=(6, 6))
    cost = {
        "numpy64": base.copy(), "numpy32": base.astype(np.float32),
        "torch64": torch.from_numpy(base.copy()), "torch32": torch.from_numpy(base).float(),
        "list": base.tolist(),
    }[kind]  # fmt: skip
    as_array = lambda c: np.array(c.numpy() if isinstance(c, torch.Tensor) else c, np.float64)  # noqa: E731
    before = as_array(cost)
    cols = solve_lap(cost, maximize=True, solver=solver)
    assert np.array_equal(as_array(cost), before)
    assert base[np.arange(6), cols.numpy()].sum() == pytest.approx(_brute(base), rel=1e-6)
