"""How a model's tensors move under orthogonal maps: each member of an admitted group along
its axis (:mod:`permask.graph.orthogonal`), and the projections of each site inside attention
head by head: RoPE's q/k frequency planes (:mod:`permask.graph.rope`), the value heads
(:mod:`permask.graph.values`) and, without RoPE, the query/key heads
(:mod:`permask.graph.query_keys`). Every site has a ``name`` (the key of its map), the
``tensors`` its map moves and ``turn(t, map, tensor)``. No checks:
:func:`permask.rotate_tensors` checks the maps first; the learned maps
(:mod:`permask.match.learned_maps`) are orthogonal by construction and call this with tensors
that carry gradients.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .graph import PermutationGraph
from .layout import Concat, GroupAxis, Layout, Product
from .orthogonal import admitted, turn_axis
from .query_keys import QueryKeySite, query_key_sites
from .rope import RopeSite, rope_sites
from .values import ValueSite, value_sites

__all__ = ["turn_tensors", "head_sites", "within_heads", "SITE_PREFIXES"]

Site = RopeSite | ValueSite | QueryKeySite
SITE_PREFIXES = ("rope:", "value:", "qk:")  #: the names of sites' maps start so


def head_sites(graph: PermutationGraph) -> list[Site]:
    """Every site of ``graph`` where maps act inside attention: RoPE, value and query/key."""
    return [*rope_sites(graph), *value_sites(graph), *query_key_sites(graph)]


def within_heads(graph: PermutationGraph, sites: list[Site] | None = None) -> set[str]:
    """The permutation groups that a value or query/key site's maps already include: groups
    whose every member is a tensor those maps turn, where the group is only ever the inner
    factor of a ``(heads, d)`` product (it permutes the dims within each head, a block-diagonal
    permutation and so one of the per-head maps). RoPE sites' planes include none."""
    sites = head_sites(graph) if sites is None else sites
    tensors = {t for s in sites if not isinstance(s, RopeSite) for t in s.tensors}
    return {
        g.name
        for g in graph
        if g.members and all(m.tensor in tensors and _inner(m.layout, g.name) for m in g.members)
    }


def _inner(layout: Layout, group: str) -> bool | None:
    """Whether ``group`` appears in ``layout`` only as the last factor of products (None: it does
    not appear)."""
    if isinstance(layout, GroupAxis):
        return False if layout.group == group else None
    if isinstance(layout, Product):
        found = [
            i == len(layout.factors) - 1 if isinstance(f, GroupAxis) and f.group == group
            else _inner(f, group)
            for i, f in enumerate(layout.factors)
        ]  # fmt: skip
    elif isinstance(layout, Concat):
        found = [_inner(p, group) for p in layout.parts]
    else:
        return None
    found = [x for x in found if x is not None]
    return all(found) if found else None


def turn_tensors(
    tensors: Mapping[str, torch.Tensor], rotations: Mapping[str, torch.Tensor],
    graph: PermutationGraph,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """A new dict with every member of each group in ``rotations`` moved as ``v -> O v`` along
    the group's axis and each site's tensors (names in :data:`SITE_PREFIXES`) turned head by
    head; folded gains and norm biases and other names pass through unchanged."""
    groups = {k: o for k, o in rotations.items() if not k.startswith(SITE_PREFIXES)}
    sites = [s for s in head_sites(graph) if s.name in rotations] if len(groups) < len(
        rotations) else []  # fmt: skip
    adms = admitted(graph, list(groups))
    out = dict(tensors)
    for name, o in groups.items():
        skip = adms[name].folded
        for m in graph.groups[name].members:
            if m.tensor in out and m.tensor not in skip:
                out[m.tensor] = turn_axis(out[m.tensor], m.axis, o)
    for site in sites:
        for tensor in site.tensors:
            if tensor in out:
                out[tensor] = site.turn(out[tensor], rotations[site.name], tensor)
    return out
