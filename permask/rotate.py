"""Orthogonal maps beyond permutations: fold norm gains, then rotate the groups that admit it.

Which groups admit an orthogonal map, and which gains must be folded first, is decided from the
graph (:mod:`permask.graph.orthogonal`). Masks are moved only by permutations
(:func:`permask.permute_mask`): a rotated weight has no zeros where the mask has them.

>>> import torch, torch.nn as nn, permask
>>> model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
>>> x = torch.randn(5, 3, dtype=torch.float64)
>>> graph = permask.trace(model, x)
>>> folded = permask.fold_norms(model, graph)
>>> rotation = permask.random_rotation(graph)
>>> list(rotation)
['0.weight:0']
>>> turned = permask.rotate_model(folded, rotation, graph)
>>> bool((turned(x) - model(x)).abs().max() < 1e-12)
True
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
import torch.nn as nn

from ._modules import unwrap
from .graph import PermutationGraph
from .graph.orthogonal import Admission, admitted, ones_complement, turn_axis

__all__ = ["fold_norms", "rotate_model", "rotate_tensors", "random_rotation"]


def fold_norms(model: nn.Module, graph: PermutationGraph, groups=None) -> nn.Module:
    """A copy of ``model`` computing the same function with the gains (and LayerNorm biases) of
    the admitted groups folded into the linear layers they feed: each gain becomes ones and
    each norm bias zeros, ``W`` becomes ``W diag(g)`` and its bias ``c + W b``."""
    target = copy.deepcopy(unwrap(model))
    named = {**dict(target.named_parameters()), **dict(target.named_buffers())}
    with torch.no_grad():
        for adm in admitted(graph, groups).values():
            for fold in adm.folds:
                g = named[fold.gain]
                b = named[fold.bias] if fold.bias is not None else None
                for w_name, axis, c_name in fold.into:
                    w = named[w_name]
                    if b is not None:
                        shift = torch.tensordot(w.double(), b.double(), dims=([axis], [0]))
                        named[c_name].add_(shift.to(named[c_name].dtype))
                    shape = [1] * w.ndim
                    shape[axis] = -1
                    w.mul_(g.reshape(shape).to(w.dtype))
                g.fill_(1)
                if b is not None:
                    b.zero_()
    return target


def rotate_tensors(
    tensors: Mapping[str, torch.Tensor], rotations: Mapping[str, torch.Tensor],
    graph: PermutationGraph,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """A new dict with every member of each group in ``rotations`` moved as ``v -> O v`` along
    the group's axis; folded gains and norm biases and other names pass through unchanged."""
    adms = admitted(graph, list(rotations))
    for name, o in rotations.items():
        _check_rotation(name, o, graph.groups[name].size, adms[name], tensors)
    out = dict(tensors)
    for name, o in rotations.items():
        skip = adms[name].folded
        for m in graph.groups[name].members:
            if m.tensor in out and m.tensor not in skip:
                out[m.tensor] = turn_axis(out[m.tensor], m.axis, o)
    return out


def rotate_model(
    model: nn.Module, rotations: Mapping[str, torch.Tensor], graph: PermutationGraph,
    inplace: bool = False,
) -> nn.Module:  # fmt: skip
    """``model`` (a copy, unless ``inplace``) with :func:`rotate_tensors` applied to its
    parameters and buffers. The gains of the rotated groups must be folded first
    (:func:`fold_norms`); then the function is unchanged."""
    target = unwrap(model) if inplace else copy.deepcopy(unwrap(model))
    named = {**dict(target.named_parameters()), **dict(target.named_buffers())}
    new = rotate_tensors(named, rotations, graph)
    with torch.no_grad():
        for name, t in new.items():
            if t is not named[name]:
                named[name].copy_(t)
    return target


def random_rotation(
    graph: PermutationGraph, generator: torch.Generator | None = None, groups=None
) -> dict[str, torch.Tensor]:
    """A Haar-random orthogonal map (float64) for every admitted group, keeping the all-ones
    direction where the group requires it."""
    out = {}
    for name, adm in admitted(graph, groups).items():
        n = graph.groups[name].size
        basis = ones_complement(n) if adm.keeps_ones else torch.eye(n, dtype=torch.float64)
        k = basis.shape[1]
        q, r = torch.linalg.qr(torch.randn(k, k, generator=generator, dtype=torch.float64))
        q = q * torch.sign(torch.diagonal(r))  # Haar measure
        out[name] = basis @ q @ basis.T + (torch.eye(n, dtype=torch.float64) - basis @ basis.T)
    return out


def _check_rotation(name: str, o: torch.Tensor, n: int, adm: Admission, tensors) -> None:
    if tuple(o.shape) != (n, n):
        raise ValueError(
            f"the map for group {name!r} has shape {tuple(o.shape)}; it needs ({n}, {n})"
        )
    o64 = o.double().cpu()
    eye = torch.eye(n, dtype=torch.float64)
    if (o64.T @ o64 - eye).abs().max() > 1e-4:
        raise ValueError(f"the map for group {name!r} is not orthogonal (O^T O != I)")
    if adm.keeps_ones and (o64 @ torch.ones(n, dtype=torch.float64) - 1).abs().max() > 1e-4:
        raise ValueError(f"the map for group {name!r} must keep the all-ones vector: a LayerNorm "
                         "centres that group")  # fmt: skip
    for fold in adm.folds:
        g = tensors.get(fold.gain)
        b = tensors.get(fold.bias) if fold.bias is not None else None
        if (g is not None and not bool((g == 1).all())) or (b is not None and bool(b.any())):
            raise ValueError(f"the gain {fold.gain} of group {name!r} is not folded; rotate "
                             "permask.fold_norms(model, graph) instead of the model")  # fmt: skip
