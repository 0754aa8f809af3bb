"""Activation matching under a memory budget: the observation plan split into passes.

Activation matching keeps, per observed unit of ``n`` channels, an ``n x n`` float64 cross sum
and four length-``n`` sums, from which the correlations are made in place: for a large model
more than memory holds (a 7B Llama's MLP units alone: about 31 GB). With
``align(..., max_stats_memory=...)`` the groups are packed, in graph order, into as few passes
as fit the budget, evened out so that the largest pass (the peak) is as small as that number
allows; each pass streams the data once more and solves its groups' assignments before the
next one starts. Groups that share a unit (blocks x within) always share a pass. A pass
observes the same values as a single pass would, so the permutation is the same
(``tests/test_match_passes.py``); it costs one more pass over the data each.

>>> import torch, permask
>>> from permask.match.points import plan_points
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
...                           torch.nn.ReLU(), torch.nn.Linear(64, 2))
>>> plan = plan_points(permask.trace(net, torch.randn(2, 4)))
>>> [len(p.points) for p in split_plan(plan, None)]
[2]
>>> [len(p.points) for p in split_plan(plan, 40_000)]
[1, 1]
>>> parse_bytes("4GiB"), parse_bytes("512MB"), parse_bytes(1000)
(4294967296, 512000000, 1000)
"""

from __future__ import annotations

import re

from .points import Plan, Point

__all__ = ["balanced", "components", "human_bytes", "parse_bytes", "plan_bytes", "split_plan"]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_bytes(size: int | str) -> int:
    """Bytes from an int or a string such as ``"4GiB"``, ``"512MB"`` or ``"1e9"``."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        found = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(size))
        unit = found and _UNITS.get(found.group(2).lower())
        if not found or unit is None:
            raise ValueError(f"memory size {size!r} is not a number of bytes; write e.g. 4GiB, "
                             "512MB or 1000000")  # fmt: skip
        value = int(float(found.group(1)) * unit)
    if value <= 0:
        raise ValueError(f"memory size must be positive, got {size!r}")
    return value


def human_bytes(size: int) -> str:
    """``size`` in the largest binary unit that leaves at least 1: ``"1.5 GiB"``."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        if size >= _UNITS[unit.lower()]:
            return f"{size / _UNITS[unit.lower()]:.1f} {unit}"
    return f"{size} B"


def components(plan: Plan) -> list[set[str]]:
    """The groups, joined where a unit holds several (they are solved together), in plan order."""
    out: list[set[str]] = []
    for unit in (u for p in plan.points for u in p.units):
        groups = set(unit.groups)
        hit = [i for i, c in enumerate(out) if c & groups]
        if not hit:
            out.append(groups)
            continue
        for i in reversed(hit[1:]):
            out[hit[0]] |= out.pop(i)
        out[hit[0]] |= groups
    return out


def plan_bytes(plan: Plan, itemsize: int = 8) -> int:
    """What a pass over ``plan`` holds: its statistics (float64: ``itemsize`` 8; float32: 4).
    Its correlation matrices are made in the statistics' buffers
    (``CorrelationStats.scores(spend=True)``)."""
    return plan.stats_bytes(itemsize)


def split_plan(plan: Plan, budget: int | None, itemsize: int = 8) -> list[Plan]:
    """``plan`` as passes of whole components, in plan order, that each fit ``budget`` bytes
    (one pass when ``budget`` is ``None`` or everything fits): as few passes as the budget
    allows, and among those the split whose largest pass is smallest, so a pass holds about
    an even share rather than all the budget takes (the peak is the largest pass).
    ``ValueError`` naming a component that alone does not fit, and the budget it needs."""
    if budget is None or plan_bytes(plan, itemsize) <= budget:
        return [plan]
    comps = components(plan)
    sizes = [plan_bytes(restricted(plan, comp), itemsize) for comp in comps]
    for comp, size in zip(comps, sizes):
        if size > budget:
            names = sorted(comp)
            more = f" and {len(names) - 2} more" if len(names) > 2 else ""
            raise ValueError(
                f"activation matching needs {human_bytes(size)} for group(s) "
                f"{', '.join(names[:2])}{more} alone, more than max_stats_memory "
                f"({human_bytes(budget)}); raise it to at least that, or use method='weight'"
            )
    runs = balanced(sizes, budget)
    return [restricted(plan, set().union(*(comps[i] for i in run))) for run in runs]


def balanced(sizes: list[int], cap: int) -> list[list[int]]:
    """Indices of ``sizes`` (each at most ``cap``) cut in order into the fewest runs whose sums
    are at most ``cap``, and among those cuts the one whose largest sum is smallest.

    >>> balanced([4, 1, 1, 1, 1], 6)
    [[0], [1, 2, 3, 4]]
    """
    fewest = len(_packed(sizes, cap))
    low, high = max(sizes), cap  # the smallest cap that still packs into `fewest` runs
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if len(_packed(sizes, mid)) <= fewest else (mid + 1, high)
    return _packed(sizes, low)


def _packed(sizes: list[int], cap: int) -> list[list[int]]:
    """Indices of ``sizes`` packed in order into the fewest runs of at most ``cap`` each
    (greedy: a run closes when the next would not fit)."""
    runs: list[list[int]] = []
    used = 0
    for i, size in enumerate(sizes):
        if not runs or used + size > cap:
            runs.append([])
            used = 0
        runs[-1].append(i)
        used += size
    return runs


def restricted(plan: Plan, groups: set[str]) -> Plan:
    """The points and units of ``plan`` that observe ``groups``."""
    points = []
    for p in plan.points:
        units = tuple(u for u in p.units if set(u.groups) <= groups)
        if units:
            points.append(Point(p.node, p.axis, p.target, p.size, units, p.mixed))
    return Plan(tuple(points), ())
