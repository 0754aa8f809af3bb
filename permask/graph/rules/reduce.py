"""Reductions over dims (sum, mean, max, norm, ...): invariant to the order of what they reduce.

Ops that also return *positions* along the reduced dim (max/min with dim, argmax, median)
freeze that dim, because a permutation would change the returned indices.
"""

from __future__ import annotations

import torch

from ..context import RuleContext
from ..registry import Decline, TracedTensor, register_rule, traced_tensors
from ._util import arg, broadcast, norm_dim, size_one

_INVARIANT = [
    "sum", "mean", "amax", "amin", "std", "var", "norm", "logsumexp", "prod", "all", "any",
    "nansum", "nanmean", torch.sum, torch.mean, torch.amax, torch.amin, torch.std, torch.var,
    torch.norm, torch.logsumexp, torch.prod, torch.all, torch.any, torch.nansum, torch.nanmean,
]  # fmt: skip
_WITH_INDICES = ["max", "min", "median", torch.max, torch.min, torch.median]
_ARG = ["argmax", "argmin", torch.argmax, torch.argmin]


def _reduced(x: TracedTensor, dim) -> list[int]:
    if dim is None:
        return list(range(x.ndim))
    dims = [dim] if isinstance(dim, int) else list(dim)
    return sorted({norm_dim(d, x.ndim) for d in dims})


def _reduce(ctx: RuleContext, x: TracedTensor, dims: list[int], keepdim: bool) -> list:
    out = []
    for k, ax in enumerate(x.axes):
        if k not in dims:
            out.append(ax)
        elif keepdim:
            out.append(size_one(ctx))
    return out


@register_rule(*_INVARIANT)
def reduce(ctx: RuleContext, x: TracedTensor, *args, **kwargs):
    is_norm = getattr(ctx.node.target, "__name__", ctx.node.target) == "norm"
    dim = kwargs.get("dim", kwargs.get("axis"))
    pos = 1 if is_norm else 0  # torch.norm(x, p, dim)
    if dim is None and len(args) > pos and not isinstance(args[pos], bool):
        if isinstance(args[pos], (int, tuple, list)):
            dim = args[pos]
    dims = _reduced(x, dim)
    for keepdim in (False, True):
        out = _reduce(ctx, x, dims, keepdim)
        if [a.size for a in out] == list(ctx.out.shape):
            return out
    raise Decline(f"cannot tell which dims {ctx.node.target} reduces")


@register_rule(*_WITH_INDICES)
def reduce_with_indices(ctx: RuleContext, x: TracedTensor, *args, **kwargs):
    """``max``/``min``/``median``: elementwise between tensors; along one dim, the values do not
    depend on where the entries sit and the indices are an index tensor (as ``topk``'s)."""
    others = traced_tensors(args, kwargs)
    if others:  # torch.max(a, b) is elementwise
        return broadcast(ctx, [x, *others], ctx.out.shape)
    dim = arg(args, kwargs, 0, "dim")
    dims = _reduced(x, dim)
    keepdim = bool(arg(args, kwargs, 1, "keepdim", False))
    out = _reduce(ctx, x, dims, keepdim)
    if not isinstance(ctx.out, tuple):
        return out
    return out, TracedTensor(ctx.out[1].shape, list(out), indexes=x.axes[dims[0]])


@register_rule(*_ARG)
def arg_reduce(ctx: RuleContext, x: TracedTensor, dim=None, keepdim: bool = False):
    """Positions of the largest/smallest along ``dim``: an index tensor; over all dims (a flat
    index) the axes stay fixed."""
    if dim is None:
        for ax in x.axes:
            ctx.freeze(ax, "argmax/argmin returns positions")
        return []
    out = _reduce(ctx, x, _reduced(x, dim), keepdim)
    return TracedTensor(ctx.out.shape, out, indexes=x.axes[norm_dim(dim, x.ndim)])


@register_rule("topk", torch.topk)
def topk(ctx: RuleContext, x: TracedTensor, k: int, dim: int = -1, largest=True, sorted=True):
    """The ``k`` largest along ``dim``, sorted: the values do not depend on where the entries
    sit, so the axis may move; the indices are its positions (an index tensor, see
    :class:`TracedTensor`), so the axis stays fixed unless every op reading them follows them.
    Unsorted results come in an order that may depend on positions: that axis stays fixed.
    Exactly tied entries are returned in an order torch does not specify, so a permutation
    could pick the other of two tied ones; with continuous values they do not occur."""
    d = norm_dim(dim, x.ndim)
    if not sorted:
        ctx.freeze(x.axes[d], "unsorted top-k returns entries by position")
    out = list(x.axes)
    out[d] = ctx.fixed(k, "top-k ranks")
    return out, TracedTensor(ctx.out[1].shape, list(out), indexes=x.axes[d])
