"""Orthogonal maps learned from the loss: the maps beyond permutations (the residual stream, RoPE's
frequency planes, attention's value and query/key heads) moved by gradient descent on the
midpoint's loss, as STE matching moves permutations.

Procrustes (:func:`permask.match_rotations`) makes B's weights or activations agree with A's;
interpolation cares about the loss of the midpoint ``(A + O(B)) / 2``. Here each map is a smooth
function of free parameters, so that loss has an exact gradient in them (no straight-through
estimate is needed): a group's map is ``exp(K - K^T)`` (on the complement of the all-ones
direction where a LayerNorm centres the group), a RoPE plane's is the rotation by an angle, a
value head's is ``exp(K - K^T)`` of its own. They start at the identity, so B should be turned
by Procrustes first (:func:`permask.merging.turned_onto` does), and Adam takes one step of
:data:`LR` per batch. Every map stays exactly orthogonal, so the turned B computes B's function,
as with Procrustes' maps.

The midpoint's loss, modes and buffers (A's, the fixed model's) are
:mod:`permask.match.midpoint`'s. Cost per step: a forward and backward of the model and one
matrix exponential per group and site.

>>> import torch, permask
>>> from permask.match.learned_maps import learn_rotations
>>> class Net(torch.nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.inp, self.norm = torch.nn.Linear(4, 8), torch.nn.RMSNorm(8)
...         self.out = torch.nn.Linear(8, 3)
...     def forward(self, x):
...         h = self.inp(x)
...         return self.out(self.norm(h + torch.relu(h)))
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<...>
>>> a, b = Net(), Net()
>>> graph = permask.trace(a, torch.randn(2, 4))
>>> a, b = permask.fold_norms(a, graph), permask.fold_norms(b, graph)
>>> data = [(torch.randn(32, 4), torch.randint(0, 3, (32,))) for _ in range(5)]
>>> maps = learn_rotations(a, b, graph, data)
>>> turned = permask.rotate_model(b, maps, graph)
>>> x = torch.randn(5, 4)
>>> bool((turned(x) - b(x)).abs().max() < 1e-5)
True
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
import torch.nn as nn

from .._modules import model_device, unwrap
from ..graph import PermutationGraph
from ..graph.orthogonal import admitted, keeping_ones
from ..graph.rope import RopeSite, plane_rotations
from ..graph.turn import head_sites, turn_tensors
from .by_activation import on_device
from .midpoint import batch_loss, midpoint_modes

__all__ = ["LR", "learn_rotations", "maps_of"]

log = logging.getLogger(__name__)

LR = 0.01  #: Adam's step on the maps' generators and angles (radians: scale-free)


def learn_rotations(
    model_a: nn.Module, model_b: nn.Module, graph: PermutationGraph, loader: Iterable, *,
    groups=None, lr: float = LR, device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """For each admitted group (or each named in ``groups``) and, without ``groups``, each RoPE,
    value and query/key site: the orthogonal map (float64, on the CPU) that brings B onto A, learned
    from the identity on the midpoint's loss over ``loader``, one step per batch (module
    docstring). Apply it with ``permask.rotate_model(model_b, maps, graph)``. Both models have
    their norms folded (:func:`permask.fold_norms`). ``{}`` when the graph admits no map;
    ``ValueError`` for a loader that yields no batch."""
    dev = torch.device(device) if device is not None else model_device(model_a)
    adms = admitted(graph, groups)
    sites = head_sites(graph) if groups is None else []
    if not adms and not sites:
        return {}
    a, b = on_device(unwrap(model_a), dev), on_device(unwrap(model_b), dev)
    params_a = {n: p.detach() for n, p in a.named_parameters()}
    params_b = {n: p.detach() for n, p in b.named_parameters()}
    buffers = {n: t.detach() for n, t in a.named_buffers()}
    free = {}
    for name, adm in adms.items():
        k = graph.groups[name].size - (1 if adm.keeps_ones else 0)
        free[name] = torch.zeros(k, k, dtype=torch.float64, device=dev, requires_grad=True)
    for s in sites:  # an angle per RoPE plane, a generator per value or key head
        d = s.head_dim
        shape = (s.kv_heads, d // 2) if isinstance(s, RopeSite) else (s.kv_heads, d, d)
        free[s.name] = torch.zeros(shape, dtype=torch.float64, device=dev, requires_grad=True)
    opt = torch.optim.Adam(list(free.values()), lr=lr)
    losses = []
    with midpoint_modes(a):
        for batch in loader:
            turned = turn_tensors(params_b, maps_of(free, adms), graph, sites)
            mid = {n: (params_a[n] + turned[n]) / 2 for n in params_a}
            loss = batch_loss(a, {**buffers, **mid}, batch, dev)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    if not losses:
        raise ValueError("the loader yielded no batches")
    log.info("learned maps: %d steps, midpoint loss %.4g -> %.4g", len(losses), losses[0],
             losses[-1])  # fmt: skip
    with torch.no_grad():
        return {k: v.cpu() for k, v in maps_of(free, adms).items()}


def maps_of(free: dict, adms: dict) -> dict[str, torch.Tensor]:
    """The maps of the free parameters (name -> tensor, as :func:`learn_rotations` learns
    them): ``exp(K - K^T)`` per group and per value or key head (kept on the all-ones direction
    where ``adms[name]`` says so), a 2-D rotation by each angle of a ``"rope:"`` site's planes.
    All zeros give the identity maps, and the maps are differentiable in the parameters."""
    out = {}
    for name, x in free.items():
        if name.startswith("rope:"):
            out[name] = plane_rotations(x)
            continue
        o = torch.matrix_exp(x - x.transpose(-1, -2))
        out[name] = keeping_ones(o) if name in adms and adms[name].keeps_ones else o
    return out
