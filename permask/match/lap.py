"""Linear assignment behind one function boundary, so solvers can be swapped or added.

``scipy`` (``scipy.optimize.linear_sum_assignment``) is exact, handles rectangular matrices and is
always available. ``lapx`` (the ``lapx`` package, imported as the module ``lap``; never install
``lap`` and ``lapx`` together, both provide that module) runs Jonker-Volgenant (``lapjvh``, the
fastest of its variants; ``lapjv`` with lapx before 0.11) and is faster than scipy at n >= 512
(docs/benchmarks.md, "LAP on correlation-like matrices"); ``"auto"`` uses it when it is
installed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Callable
from functools import cache

import numpy as np
import torch

__all__ = ["solve_lap", "available_solvers", "optima"]


def _scipy(cost: np.ndarray) -> np.ndarray:
    """The minimal assignment (:func:`solve_lap` negates a score it maximises)."""
    from scipy.optimize import linear_sum_assignment

    return _column_per_row(cost.shape[0], *linear_sum_assignment(cost))


def _lapx(cost: np.ndarray) -> np.ndarray:
    """The minimal assignment (:func:`solve_lap` negates a score it maximises)."""
    import lap

    square = cost.shape[0] == cost.shape[1]
    if not hasattr(lap, "lapjvh"):  # lapx before 0.11
        _, x, _ = lap.lapjv(cost, extend_cost=not square)
        return np.asarray(x, dtype=np.int64)
    rows, cols = lap.lapjvh(cost, extend_cost=not square, return_cost=False)
    return _column_per_row(cost.shape[0], rows, cols)


def _column_per_row(n: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Aligned ``(rows, cols)`` pairs as each row's column, -1 for rows left over."""
    out = np.full(n, -1, dtype=np.int64)
    out[rows] = cols
    return out


_SOLVERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"scipy": _scipy, "lapx": _lapx}


@cache
def _has_lapx() -> bool:
    if importlib.util.find_spec("lap") is None:
        return False
    try:
        importlib.metadata.version("lapx")
    except importlib.metadata.PackageNotFoundError:  # the module is the older `lap` package
        return False
    return True


def available_solvers() -> list[str]:
    """Solver names usable here (``"scipy"`` always; ``"lapx"`` when installed)."""
    return ["scipy", "lapx"] if _has_lapx() else ["scipy"]


def _check_finite(cost: np.ndarray) -> None:
    if not np.isfinite(cost).all():
        raise ValueError("cost matrix has NaN or inf entries")


def solve_lap(
    cost: torch.Tensor | np.ndarray, maximize: bool = True, solver: str = "auto"
) -> torch.Tensor:
    """Optimal assignment of rows to columns of an ``[n, m]`` score matrix.

    Returns a LongTensor ``cols`` of length n: row ``i`` goes to column ``cols[i]`` (``-1`` for
    rows left over when n > m). With ``maximize=True`` the sum of assigned entries is maximal.
    ``solver`` is ``"auto"`` (lapx if installed, else scipy), ``"scipy"`` or ``"lapx"``.
    """
    if solver == "auto":
        solver = "lapx" if _has_lapx() else "scipy"
    if solver not in _SOLVERS:
        raise ValueError(f"unknown LAP solver {solver!r}; choose 'auto' or one of {list(_SOLVERS)}")
    if solver == "lapx" and not _has_lapx():
        raise ImportError("solver='lapx' needs the lapx package (pip install lapx)")
    if isinstance(cost, torch.Tensor):  # one copy: contiguous float64 on the CPU (lapjv needs it)
        copy = cost.detach().to("cpu", torch.float64, memory_format=torch.contiguous_format)
        ours = copy.data_ptr() != cost.data_ptr()
        cost = copy.numpy()
    else:
        given, cost = cost, np.ascontiguousarray(cost, dtype=np.float64)
        ours = not np.may_share_memory(cost, given)
    if cost.ndim != 2:
        raise ValueError(f"cost must be a 2-D matrix, got shape {cost.shape}")
    _check_finite(cost)
    if cost.size == 0:
        return torch.full((cost.shape[0],), -1, dtype=torch.long)
    if maximize:  # negated here, in place when the float64 copy is ours: no second n x n copy
        cost = np.negative(cost, out=cost if ours else None)
    return torch.from_numpy(_SOLVERS[solver](cost))


def optima(blocks: np.ndarray) -> np.ndarray:
    """The optimal (maximal) sums of many small square LAPs at once: ``blocks`` is
    ``[k, m, m]``, the result ``[k]``. Only the values, which every exact solver agrees on, so
    one loop over scipy without per-call conversions: the block pairs of structured groups
    (:mod:`permask.match.assign`) are thousands of LAPs of a few elements each, where a call of
    :func:`solve_lap` costs several times the solve."""
    from scipy.optimize import linear_sum_assignment

    blocks = np.ascontiguousarray(blocks, dtype=np.float64)
    if blocks.ndim != 3 or blocks.shape[1] != blocks.shape[2]:
        raise ValueError(f"blocks must be [k, m, m], got shape {blocks.shape}")
    _check_finite(blocks)
    out = np.empty(blocks.shape[0])
    for k, block in enumerate(blocks):
        rows, cols = linear_sum_assignment(block, maximize=True)
        out[k] = block[rows, cols].sum()
    return out
