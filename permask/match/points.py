"""Where activation matching looks at each group, and how a group's channels sit on that axis.

Observation points of a group (the first rule that finds any wins):

1. outputs of nonlinearities (ReLU, GELU, SiLU, ... as modules, functions or methods, and timm's
   fused norm+act modules): the hidden units themselves, as in the paper;
2. residual additions (``add``/``iadd``): the residual stream where a group is a stream;
3. any other observation except pass-through ops (dropout, identity, reshape/view, flatten,
   transpose, getitem, ...) that would only repeat the same values.

What an op is, its *role*, is what its rule's registration says (``Observation.role``; see
:func:`permask.graph.registry.register_role`).

Samples are the positions along the other axes of the observed tensor (batch, space, tokens),
which must be the same in A and B. Where another axis is itself moved by a group (a token-mixing
MLP's ``[batch, channels, hidden tokens]``: A's and B's hidden tokens are in different orders),
that axis is averaged out first (a permutation-invariant summary), leaving fewer samples, and
such an observation is used only for groups that have no other. Without this, the samples of A
and B would be positions of different hidden units and the correlations noise (docs/history.md,
"Alignment: how the reference got here", has what that did to MLP-Mixer).

A group's channels at a point are found with :func:`~permask.graph.layout.group_element_map`. A
group repeated inside a product (e.g. ``(C x fixed(HW))`` after a flatten) gives ``k`` samples
per position. Two groups that share positions (``(blocks x within)`` of a grouped conv or
GroupNorm, or deeper nestings) form a *structured* unit whose full cross-correlation is kept, so
that the blocks and the within-block orders can be solved jointly (:mod:`permask.match.assign`);
such groups use only their structured units.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..graph import Observation, PermutationGraph
from ..graph.layout import Layout, group_element_map, layout_groups
from .assign import nesting, tangled

__all__ = ["Unit", "Point", "Plan", "axis_units", "plan_points", "select_observations"]


@dataclass(frozen=True)
class Unit:
    """Channels of ``groups`` on one axis: ``index[r, e]`` is the position of replica ``r`` of
    element ``e``; for nested groups (outermost first) ``e`` is row-major, e.g. for (outer,
    inner) ``e = outer * n_inner + inner``."""

    groups: tuple[str, ...]
    index: torch.Tensor

    @property
    def size(self) -> int:
        return self.index.shape[1]


@dataclass(frozen=True)
class Point:
    """One observed activation axis: axis ``axis`` of fx node ``node``'s output."""

    node: str
    axis: int
    target: str
    size: int
    units: tuple[Unit, ...]
    mixed: tuple[int, ...] = ()  # other axes a permutation moves: averaged out (module doc)


@dataclass(frozen=True)
class Plan:
    """Observation points in graph order, and groups left without any (kept in place)."""

    points: tuple[Point, ...]
    unmatched: tuple[str, ...]

    def stats_bytes(self, itemsize: int = 8) -> int:
        """Statistics memory (float64: ``itemsize`` 8): per unit an n x n cross sum and four
        length-n sums."""
        return sum(itemsize * (u.size**2 + 4 * u.size) for p in self.points for u in p.units)


def select_observations(
    observations: list[Observation], permuted: dict[str, set[int]] | None = None
) -> list[Observation]:
    """The observation points activation matching uses for one group (rules in module doc):
    by the role each op's rule registered (:func:`permask.graph.registry.register_role`).
    ``permuted``: node -> the axes of its output that groups move; observations with another
    moved axis are used only where a group has no other (module doc)."""
    usable = [o for o in observations if o.op != "get_attr" and o.item is None]  # single outputs
    if permuted:
        usable = [o for o in usable if not permuted.get(o.node, set()) - {o.axis}] or usable
    for wanted in ("nonlinear", "residual"):
        chosen = [o for o in usable if o.role == wanted]
        if chosen:
            return chosen
    return [o for o in usable if o.role != "pass_through"]


def axis_units(layout: Layout, sizes: dict[str, int]) -> list[Unit]:
    """Split an axis into units: positions carrying one group, or several jointly (a chain of
    nested groups, outermost first)."""
    groups = layout_groups(layout)
    if not groups:
        return []
    maps = torch.stack([group_element_map(layout, g) for g in groups])
    combos: dict[tuple[int, ...], list[int]] = {}
    for pos, col in enumerate((maps >= 0).T.tolist()):
        combo = tuple(i for i, p in enumerate(col) if p)
        if combo:
            combos.setdefault(combo, []).append(pos)
    units = []
    for combo, positions in combos.items():
        pos = torch.tensor(positions)
        # outermost first: an inner group's element changes more often along the axis
        rows = sorted(combo, key=lambda i: int((maps[i, pos][1:] != maps[i, pos][:-1]).sum()))
        elem = torch.zeros(len(pos), dtype=torch.long)
        for i in rows:
            elem = elem * sizes[groups[i]] + maps[i, pos]
        n = 1
        for i in rows:
            n *= sizes[groups[i]]
        index = pos[torch.argsort(elem, stable=True)].reshape(n, len(pos) // n).T.contiguous()
        units.append(Unit(tuple(groups[i] for i in rows), index))
    return units


def plan_points(graph: PermutationGraph) -> Plan:
    """Choose every group's observation points and lay out the units to correlate there."""
    order = {n.name: i for i, n in enumerate(graph.fx_graph.nodes)}
    sizes = {g.name: g.size for g in graph}
    permuted: dict[str, set[int]] = {}
    for g in graph:
        for o in g.observations:
            if o.item is None:
                permuted.setdefault(o.node, set()).add(o.axis)
    chosen: dict[tuple[str, int], tuple[Observation, set[str]]] = {}
    for g in graph:
        for o in select_observations(g.observations, permuted):
            chosen.setdefault((o.node, o.axis), (o, set()))[1].add(g.name)
    found: list[tuple[Observation, list[Unit]]] = []
    for key in sorted(chosen, key=lambda k: (order[k[0]], k[1])):
        obs, wanted = chosen[key]
        found.append((obs, [u for u in axis_units(obs.layout, sizes) if wanted & set(u.groups)]))
    # groups of a structure that is not a forest: no joint solve, so no units; weight matching
    # solves them (Plan.unmatched)
    tangle = tangled([u.groups for _, units in found for u in units])
    found = [(obs, [u for u in units if not tangle & set(u.groups)]) for obs, units in found]
    parent = nesting([u.groups for _, units in found for u in units])
    structured = set(parent) | set(parent.values())
    points, seen = [], set()
    for obs, units in found:
        keep = tuple(u for u in units if len(u.groups) > 1 or u.groups[0] not in structured)
        if keep:
            mixed = tuple(sorted(permuted[obs.node] - {obs.axis}))
            points.append(Point(obs.node, obs.axis, obs.target, obs.layout.size, keep, mixed))
            seen.update(g for u in keep for g in u.groups)
    unmatched = tuple(g.name for g in graph if g.name not in seen)
    return Plan(tuple(points), unmatched)
