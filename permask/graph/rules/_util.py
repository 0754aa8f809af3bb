"""Small helpers shared by the rule files."""

from __future__ import annotations

from typing import Any

from ..context import RuleContext
from ..registry import Decline, TracedTensor


def norm_dim(dim: int, ndim: int) -> int:
    if not -ndim <= dim < max(ndim, 1):
        raise Decline(f"dim {dim} out of range for {ndim} dims")
    return dim % ndim if ndim else 0


def arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    """Positional argument ``i`` or keyword ``name`` (rules see fx's args as called)."""
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def size_one(ctx: RuleContext) -> Any:
    """A fixed layout for a new axis of size 1 (``unsqueeze``, ``keepdim``)."""
    return ctx.fixed(1, "size-1 axis")


def broadcast(ctx: RuleContext, inputs: list[TracedTensor], out_shape: tuple[int, ...]) -> list:
    """Output layouts of a broadcasting elementwise op; equal-size axes are unified."""
    n = len(out_shape)
    out: list = [None] * n
    for t in inputs:
        if t.ndim > n:
            raise Decline(f"input of rank {t.ndim} for an output of rank {n}")
        for i, (ax, s) in enumerate(zip(t.axes, t.shape)):
            j = n - t.ndim + i
            if s == out_shape[j]:
                if out[j] is None:
                    out[j] = ax
                else:
                    ctx.unify(out[j], ax)
            elif s != 1:
                raise Decline(f"axis of size {s} does not broadcast to {out_shape[j]}")
    return [ax if ax is not None else ctx.fixed(s, "broadcast") for ax, s in zip(out, out_shape)]
