"""Straight-through estimator (STE) matching: Git Re-Basin's third method (Ainsworth et al.,
ICLR 2023, Algorithm 3), on any traced graph.

Weight matching maximises the weights' agreement; STE matching minimises what interpolation
cares about, the loss of the midpoint. It learns free weights ``W~``, started at the fixed
model B's weights, as Git Re-Basin's ports do (the first projection is weight matching's pi):
every step projects them onto A's permutations, pi = the weight matching of A to ``W~``
(warm-started from the last pi), evaluates the midpoint ``(pi(A) + B) / 2`` on one batch, and
moves ``W~`` by the gradient of that loss taken at pi(A) (the straight-through estimate: the
projection counts as the identity). One pass over the loader is one step per batch; for more
steps pass a loader of several epochs (``list(loader) * 10``). The pi of the last projection is
returned.

Started at pi(A) instead, ``W~`` would project onto pi by A's agreement with itself, a margin
that steps of this size do not overcome: pi would stay weight matching's.

The midpoint's loss, modes and buffers (B's) are :mod:`permask.match.midpoint`'s. Its step is
Adam with a learning rate per tensor of :data:`LR` times the RMS of A's tensor, so one setting
fits weights of any scale (the paper's fixed 1e-3 was tuned for its MLPs; relative 0.01, 0.03,
0.1 and 0.3 were compared on a small MLP pair and the trained transformer pairs:
docs/alignment.md).

Cost: a weight matching per step (warm-started: usually one or two sweeps) plus a forward and
backward of the model; docs/alignment.md, "Straight-through matching".

>>> import torch, permask
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<...>
>>> a = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
>>> graph = permask.trace(a, torch.randn(2, 4))
>>> pi = permask.random_permutation(graph, torch.Generator().manual_seed(1))
>>> b = permask.permute_model(a, pi, graph)
>>> data = [(torch.randn(32, 4), torch.randint(0, 3, (32,))) for _ in range(3)]
>>> permask.align(a, b, data, method="ste", graph=graph) == pi
True
"""

from __future__ import annotations

import itertools
import logging

import torch

from ..graph import Permutation
from ..graph.layout import permute_axes
from .by_activation import on_device
from .info import AlignInfo
from .midpoint import batch_loss, midpoint_modes
from .request import MatchRequest
from .weight import weight_matching

__all__ = ["LR", "ste_matching"]

log = logging.getLogger(__name__)

LR = 0.03  #: Adam's step for a free tensor, relative to the RMS of A's tensor (scale-free)


def ste_matching(req: MatchRequest) -> tuple[Permutation, AlignInfo]:
    """pi from STE matching of ``req``'s models over its batches (see the module docstring)."""
    if req.batches is None:
        raise ValueError("STE matching needs a loader (the midpoint's loss); or method='weight'")
    a, b = on_device(req.model_a, req.device), on_device(req.model_b, req.device)
    params_a = {n: p.detach() for n, p in a.named_parameters()}
    params_b = {n: p.detach() for n, p in b.named_parameters()}
    perms = None  # the first step's projection (of A onto B's weights) is weight matching
    free = {n: t.clone().requires_grad_(True) for n, t in params_b.items()}
    scale = {n: float(t.square().mean().sqrt()) for n, t in params_a.items()}
    opt = torch.optim.Adam([{"params": [t], "lr": LR * scale[n]} for n, t in free.items()])
    buffers = {n: t.detach().clone() for n, t in b.named_buffers()}
    steps, losses = 0, []
    first = [req.first] if req.first is not None else []
    with midpoint_modes(b):
        for batch in itertools.chain(first, req.batches):
            target = {n: t.detach() for n, t in free.items()}
            perms = weight_matching(
                params_a, target, req.graph, seed=req.seed, solver=req.solver, init=perms
            ).perms
            moved = _moved(params_a, perms, req)
            mid = {n: (moved[n] + free[n] - free[n].detach() + params_b[n]) / 2 for n in free}
            loss = batch_loss(b, {**buffers, **mid}, batch, req.device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            losses.append(float(loss.detach()))
    if not steps:
        raise ValueError("the loader yielded no batches")
    target = {n: t.detach() for n, t in free.items()}
    perms = weight_matching(
        params_a, target, req.graph, seed=req.seed, solver=req.solver, init=perms
    ).perms
    log.info("STE matching: %d steps, midpoint loss %.4g -> %.4g", steps, losses[0], losses[-1])
    info = AlignInfo("ste", 0.0, len(req.graph), batches=steps, iterations=steps,
                     objective=losses[-1])  # fmt: skip
    return Permutation(perms), info


def _moved(params: dict[str, torch.Tensor], perms, req: MatchRequest) -> dict[str, torch.Tensor]:
    """A's parameters moved by ``perms``."""
    return {n: permute_axes(t, req.graph.tensors.get(n, ()), perms) for n, t in params.items()}
