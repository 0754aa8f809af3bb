"""How a model's tensors move under orthogonal maps: each member of an admitted group along
its axis (:mod:`permask.graph.orthogonal`), each RoPE site's q and k projections plane by plane
(:mod:`permask.graph.rope`), and each value site's value and output projections head by head
(:mod:`permask.graph.values`). No checks: :func:`permask.rotate_tensors` checks the maps
first; the learned maps (:mod:`permask.match.learned_maps`) are orthogonal by construction and
call this with tensors that carry gradients.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .graph import PermutationGraph
from .orthogonal import admitted, turn_axis
from .rope import rope_sites, turn_planes
from .values import turn_values, value_sites

__all__ = ["turn_tensors"]


def turn_tensors(
    tensors: Mapping[str, torch.Tensor], rotations: Mapping[str, torch.Tensor],
    graph: PermutationGraph,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """A new dict with every member of each group in ``rotations`` moved as ``v -> O v`` along
    the group's axis, each RoPE site in it (``rope:...``) turned plane by plane and each value
    site (``value:...``) head by head; folded gains and norm biases and other names pass
    through unchanged."""
    groups = {k: o for k, o in rotations.items() if not k.startswith(("rope:", "value:"))}
    sites = {s.name: s for s in rope_sites(graph) if s.name in rotations}
    values = [s for s in value_sites(graph) if s.name in rotations]
    adms = admitted(graph, list(groups))
    out = dict(tensors)
    for name, o in groups.items():
        skip = adms[name].folded
        for m in graph.groups[name].members:
            if m.tensor in out and m.tensor not in skip:
                out[m.tensor] = turn_axis(out[m.tensor], m.axis, o)
    for name, site in sites.items():
        for tensor, key in site.projections:
            if tensor in out:
                out[tensor] = turn_planes(out[tensor], rotations[name], site, key)
    for site in values:
        for tensor in site.tensors:
            if tensor in out:
                out[tensor] = turn_values(out[tensor], rotations[site.name], site, tensor)
    return out
