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
from .layout import group_element_map
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
    """The permutation groups that the value and query/key sites' maps already include: groups
    whose every member is an axis those maps turn, where the group's elements lie inside the
    turned heads' rows and each head's block of ``d`` holds all of them or none (a permutation
    of them stays inside each head: a block-diagonal permutation, one of the per-head maps).
    RoPE sites' planes include none."""
    sites = head_sites(graph) if sites is None else sites
    spans: dict[tuple[str, int], list[tuple[int, int, int]]] = {}
    for s in sites:
        rows = [s.rows] if isinstance(s, ValueSite) else [] if isinstance(s, RopeSite) else [
            s.query, s.key]  # fmt: skip
        for r in rows:
            block = (r.start, r.heads * r.head_dim, r.head_dim)
            spans.setdefault((r.weight, r.axis), []).append(block)
            if r.bias is not None:
                spans.setdefault((r.bias, 0), []).append(block)
        if isinstance(s, ValueSite):
            spans.setdefault((s.out, s.out_axis), []).append((0, s.heads * s.head_dim, s.head_dim))
    return {
        g.name
        for g in graph
        if g.members and all(_inside(m, g, spans.get((m.tensor, m.axis), ())) for m in g.members)
    }


def _inside(member, group, blocks) -> bool:
    """Whether every position of ``group`` on ``member``'s axis lies in one of ``blocks``
    (start, width, d), each ``d``-block of those holding all of the group's elements or none."""
    elements = group_element_map(member.layout, group.name)
    covered = torch.zeros(len(elements), dtype=torch.bool)
    every = set(range(group.size))
    for start, width, d in blocks:
        heads = elements[start : start + width].reshape(-1, d)
        if any(set(h[h >= 0].tolist()) not in (set(), every) for h in heads):
            return False
        covered[start : start + width] = True
    return bool((elements >= 0).any()) and not bool(((elements >= 0) & ~covered).any())


def turn_tensors(
    tensors: Mapping[str, torch.Tensor], rotations: Mapping[str, torch.Tensor],
    graph: PermutationGraph, sites: list[Site] | None = None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """A new dict with every member of each group in ``rotations`` moved as ``v -> O v`` along
    the group's axis and each site's tensors (names in :data:`SITE_PREFIXES`) turned head by
    head; folded gains and norm biases and other names pass through unchanged. ``sites``: the
    graph's :func:`head_sites`, when the caller has them already."""
    groups = {k: o for k, o in rotations.items() if not k.startswith(SITE_PREFIXES)}
    if len(groups) < len(rotations):
        sites = [s for s in (head_sites(graph) if sites is None else sites) if s.name in rotations]
    else:
        sites = []
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
