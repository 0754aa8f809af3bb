"""How a model's tensors move under orthogonal maps: each member of an admitted group along
its axis (:mod:`permask.graph.orthogonal`), and each RoPE site's q and k projections plane by
plane (:mod:`permask.graph.rope`). No checks: :func:`permask.rotate_tensors` checks the maps
first; the learned maps (:mod:`permask.match.learned_maps`) are orthogonal by construction and
call this with tensors that carry gradients.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .graph import PermutationGraph
from .orthogonal import admitted, turn_axis
from .rope import rope_sites, turn_planes

__all__ = ["turn_tensors"]


def turn_tensors(
    tensors: Mapping[str, torch.Tensor], rotations: Mapping[str, torch.Tensor],
    graph: PermutationGraph,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """A new dict with every member of each group in ``rotations`` moved as ``v -> O v`` along
    the group's axis, and each RoPE site in it (``rope:...``) turned plane by plane; folded
    gains and norm biases and other names pass through unchanged."""
    groups = {k: o for k, o in rotations.items() if not k.startswith("rope:")}
    sites = {s.name: s for s in rope_sites(graph) if s.name in rotations}
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
    return out
