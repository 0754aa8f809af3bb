"""Apply a :class:`~permask.graph.Permutation` to models, state dicts and masks."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
import torch.nn as nn

from ._modules import named_tensors, unwrap, write_tensors
from .graph import Permutation, PermutationGraph
from .graph.layout import layout_groups, permute_axes

__all__ = ["permute_model", "permute_mask", "permute_tensors"]


def permute_tensors(
    tensors: Mapping[str, torch.Tensor], pi: Permutation, graph: PermutationGraph
) -> dict[str, torch.Tensor]:
    """Return a new dict where every tensor the graph knows is permuted along its axes.

    Names not in the graph pass through unchanged. Each tensor's shape must match the traced
    one (a clear error names the tensor otherwise).
    """
    _check_groups(pi, graph)
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        layouts = graph.tensors.get(name)
        if layouts is None or not any(layout_groups(x) for x in layouts):
            out[name] = t
            continue
        if tuple(t.shape) != tuple(x.size for x in layouts):
            raise ValueError(
                f"tensor '{name}' has shape {tuple(t.shape)} but the graph traced "
                f"{tuple(x.size for x in layouts)}; trace the model this tensor belongs to"
            )
        out[name] = permute_axes(t, layouts, pi)
    return out


def permute_mask(
    mask: Mapping[str, torch.Tensor], pi: Permutation, graph: PermutationGraph
) -> dict[str, torch.Tensor]:
    """Move every mask entry along the same axes as its weight (sparsity is kept exactly).

    Entries of tensors that no group permutes are returned unchanged. Every name must be a
    parameter of the traced model, with its shape: a mask of another model would otherwise
    pass through unpermuted and fail only later, far from the cause.
    """
    for name, m in mask.items():
        if name not in graph.parameters:
            raise KeyError(
                f"mask entry {name!r} names no parameter of the traced model; mask names must "
                "be those of model.named_parameters() of the (unwrapped) model the graph was "
                "traced from"
            )
        shape = tuple(graph.shapes[name])
        if tuple(m.shape) != shape:
            raise ValueError(
                f"mask entry {name!r} has shape {tuple(m.shape)} but the parameter has {shape}: "
                "the mask is of another model; compute it on the model the graph was traced "
                "from (e.g. magnitude_mask(model_a, 0.9)), or trace the model the mask fits"
            )
    return permute_tensors(mask, pi, graph)


def permute_model(
    model: nn.Module, pi: Permutation, graph: PermutationGraph, inplace: bool = False
) -> nn.Module:
    """Permute parameters and buffers (BatchNorm running stats included) of ``model``.

    DDP/DataParallel/``torch.compile`` wrappers are looked through: returns a permuted copy of
    the module inside, or with ``inplace=True`` that module itself (the Parameter objects
    are kept, so optimizers holding them stay valid). Caches that modules filled from their
    parameters in eval mode are cleared. The function the model computes is
    unchanged (in eval mode; in train mode as well, up to BatchNorm batch statistics order).
    Groups that ``pi`` does not name stay in place.
    """
    model = unwrap(model)
    target = model if inplace else copy.deepcopy(model)
    named = named_tensors(target)
    missing = [n for n in graph.permuted_tensors if n not in named]
    if missing:
        raise ValueError(
            f"model has no tensor '{missing[0]}' that the graph permutes; "
            "pass the graph traced from this architecture"
        )
    write_tensors(target, permute_tensors({n: named[n] for n in graph.permuted_tensors}, pi, graph))
    return target


def _check_groups(pi: Permutation, graph: PermutationGraph) -> None:
    for name, p in pi.items():
        g = graph.groups.get(name)
        if g is None:
            raise ValueError(
                f"permutation has group '{name}' that the graph does not know; "
                "was it computed for another model or trace?"
            )
        if len(p) != g.size:
            raise ValueError(f"group '{name}' has size {g.size} but its permutation has {len(p)}")
