"""The rows of an attention input's heads in the weight of the projection that makes them:
found on the traced graph (:func:`head_rows`), viewed and turned head by head
(:class:`HeadRows`).

A query, key or value ``[B, heads, T, d]`` is made, in the patterns known here, by

* ``linear(x, W, b?)`` -> ``view(B, T, heads, d)`` -> ``transpose(1, 2)`` (Llama, BERT);
* the same with the input one part of a fused projection split along its last dim (``split``
  -> ``getitem``), the projection a linear layer or ``addmm`` on ``view(x, [-1, C])`` (GPT-2's
  ``Conv1D``, whose weight holds the rows as columns);
* ``linear`` -> ``reshape(B, T, parts, heads, d)`` -> ``permute(2, 0, 3, 1, 4)`` ->
  ``unbind(0)`` and one item (timm's fused qkv);

each step read by nothing else (the other parts of a fused projection may be read anywhere).
Head ``h`` is then rows ``start + h d ... start + (h + 1) d`` of the weight along its output
axis, and of the bias. The view must split only the last dim (checked on the traced shapes, or,
where the graph has none, on the sizes as written).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from .attention import RESHAPE, linear_params, readers, shape_of, sizes_of
from .graph import PermutationGraph
from .orthogonal import kind_of, work_dtype
from .rules._util import arg

__all__ = ["HeadRows", "head_rows", "only_part"]


@dataclass(frozen=True)
class HeadRows:
    """``heads`` heads of ``head_dim`` rows each, from ``start`` on along axis ``axis`` of
    ``weight`` (and axis 0 of ``bias``, or None)."""

    weight: str
    bias: str | None
    axis: int
    start: int
    heads: int
    head_dim: int

    @property
    def tensors(self) -> list[str]:
        return [t for t in (self.weight, self.bias) if t is not None]

    def view(self, t: torch.Tensor, tensor: str) -> torch.Tensor:
        """``tensor`` (the weight or the bias) as ``[heads, d, rest]``: its rows by head."""
        axis = self.axis if tensor == self.weight else 0
        block = t.narrow(axis, self.start, self.heads * self.head_dim).movedim(axis, 0)
        return block.reshape(self.heads, self.head_dim, -1)

    def turn(self, t: torch.Tensor, m: torch.Tensor, tensor: str) -> torch.Tensor:
        """``tensor`` with head ``h``'s rows mapped ``v -> m[h] v`` (``m``: ``[heads, d, d]``),
        the other rows unchanged; in ``t``'s dtype, differentiable in ``t`` and ``m``."""
        work = work_dtype(t)
        axis = self.axis if tensor == self.weight else 0
        width = self.heads * self.head_dim
        block = t.narrow(axis, self.start, width).movedim(axis, 0)
        heads = self.view(t.to(work), tensor)
        rows = torch.einsum("kpq,kqz->kpz", m.to(device=t.device, dtype=work), heads)
        rows = rows.reshape(block.shape).movedim(0, axis)
        after = t.shape[axis] - self.start - width
        parts = [t.narrow(axis, 0, self.start).to(work), rows,
                 t.narrow(axis, self.start + width, after).to(work)]  # fmt: skip
        return torch.cat(parts, axis).to(t.dtype)


def head_rows(graph: PermutationGraph, x: fx.Node) -> tuple[HeadRows, tuple] | None:
    """The rows making the heads ``x`` (``[B, heads, T, d]``) in their projection, and the first
    two sizes ``x`` was made with as written (module docstring); None for another pattern."""
    if kind_of(x) == "getitem":  # timm: unbind(permute(reshape(linear, [B, T, 3, H, d])))[i]
        return _fused_heads(graph, x)
    if kind_of(x) != "transpose" or tuple(x.args[1:3]) not in ((1, 2), (2, 1)):
        return None
    view = x.args[0]
    sizes = sizes_of(view)
    if kind_of(view) not in RESHAPE or len(sizes) != 4 or len(readers(view)) != 1:
        return None
    d, x, start = sizes[3], _unscaled(view.args[0]), 0
    if not isinstance(d, int) or d <= 0:
        return None
    if kind_of(x) == "getitem":  # one part of a split fused projection
        x, start, width = _split_part(x)
        if x is None:
            return None
    else:
        width = None
    made = _projection(graph, x)
    if made is None:
        return None
    weight, axis, bias = made
    rows = graph.shapes.get(weight, ())[axis] if len(graph.shapes.get(weight, ())) > axis else 0
    width = rows - start if width is None else width
    if width <= 0 or width % d or start + width > rows:
        return None
    kv, shape = width // d, shape_of(view)  # the view splits only the last dim: (heads, d)
    if (shape is not None and shape[2:] != (kv, d)) or (shape is None and sizes[2] != kv):
        return None
    return HeadRows(weight, bias, axis, start, kv, d), tuple(sizes[:2])


def _unscaled(x: fx.Node) -> fx.Node:
    """``y`` for ``x = y * c``, ``c * y`` or ``y / c`` (``c`` a Python number, not 0; ``x`` read
    by nothing else: OPT's scaled query), else ``x``. A scalar commutes with every head's map,
    so the rows that make ``x`` are ``y``'s."""
    simple = len(x.args) == 2 and not x.kwargs and len(readers(x)) == 1
    if kind_of(x) not in ("mul", "div", "truediv") or not simple:
        return x
    y, c = x.args
    if kind_of(x) == "mul" and not isinstance(y, fx.Node):
        y, c = c, y
    number = isinstance(c, (int, float)) and not isinstance(c, bool) and c != 0
    return y if isinstance(y, fx.Node) and number else x


def _split_part(item: fx.Node) -> tuple[fx.Node | None, int, int]:
    """(the split tensor, the part's start, its width) for ``split(x, size, -1)[i]`` along the
    last dim, the part read by nothing else; (None, 0, 0) otherwise."""
    split = item.args[0]
    if kind_of(split) not in ("split", "split_with_sizes") or not isinstance(item.args[1], int):
        return None, 0, 0
    x, sizes = split.args[0], arg(split.args, split.kwargs, 1, "split_size")
    dim = arg(split.args, split.kwargs, 2, "dim", 0)
    ndim = len(sizes_of(x)) if kind_of(x) in RESHAPE else None
    if dim != -1 and (ndim is None or dim != ndim - 1):
        return None, 0, 0
    i = item.args[1]
    if isinstance(sizes, int) and sizes > 0:
        start, width = i * sizes, sizes
    elif isinstance(sizes, (list, tuple)) and all(isinstance(n, int) for n in sizes):
        if i >= len(sizes):
            return None, 0, 0
        start, width = sum(sizes[:i]), sizes[i]
    else:
        return None, 0, 0
    if len(readers(x)) != 1 or len(readers(item)) != 1 or not only_part(split, item):
        return None, 0, 0
    return x, start, width


def only_part(parts: fx.Node, item: fx.Node) -> bool:
    """Whether ``item`` is the one reader of its part of ``parts`` (a ``split`` or ``unbind``):
    every reader is a ``getitem`` of an index >= 0, and only ``item`` has its index."""
    users = readers(parts)
    index = [u.args[1] if kind_of(u) == "getitem" and len(u.args) > 1 else None for u in users]
    return (
        item in users
        and all(isinstance(i, int) and i >= 0 for i in index)
        and index.count(item.args[1]) == 1
    )


def _projection(graph: PermutationGraph, x: fx.Node) -> tuple[str, int, str | None] | None:
    """(weight, its axis of the output features, bias) of the linear layer making ``x`` and
    feeding nothing else: ``linear``, or ``view(addmm(b, view(h, [-1, C]), W), ...)``."""
    if len(readers(x)) != 1:
        return None
    if kind_of(x) in RESHAPE and kind_of(x.args[0]) == "addmm":
        mm = x.args[0]
        if len(readers(mm)) != 1 or not all(isinstance(a, fx.Node) and a.op == "get_attr"
                                            for a in (mm.args[0], mm.args[2])):  # fmt: skip
            return None
        weight, bias = mm.args[2].target, mm.args[0].target
        columns = graph.shapes.get(weight, (0, 0))[1]
        ok = sizes_of(x)[-1:] == (columns,) and graph.shapes.get(bias) == (columns,)
        return (weight, 1, bias) if ok else None
    params = linear_params(x)
    if params is None:
        return None
    weight, bias = params
    rows = graph.shapes.get(weight, (0,))[0]
    return (weight, 0, bias) if bias is None or graph.shapes.get(bias) == (rows,) else None


def _fused_heads(graph: PermutationGraph, item: fx.Node) -> tuple[HeadRows, tuple] | None:
    """:func:`head_rows` for timm's ``unbind(permute(reshape(linear, [B, T, 3, H, d]),
    [2, 0, 3, 1, 4]))[i]``."""
    unbind = item.args[0]
    if kind_of(unbind) != "unbind" or arg(unbind.args, unbind.kwargs, 1, "dim", 0) != 0:
        return None
    permute = unbind.args[0]
    dims = permute.args[1] if len(permute.args) == 2 else permute.args[1:]
    if kind_of(permute) != "permute" or tuple(dims) != (2, 0, 3, 1, 4):
        return None
    reshape = permute.args[0]
    sizes = sizes_of(reshape)
    if kind_of(reshape) not in RESHAPE or len(sizes) != 5 or not isinstance(item.args[1], int):
        return None
    parts, heads, d = sizes[2:]
    if not all(isinstance(n, int) and n > 0 for n in (parts, heads, d)):
        return None
    if not 0 <= item.args[1] < parts or not only_part(unbind, item):
        return None
    if any(len(readers(n)) != 1 for n in (reshape, permute)):
        return None
    made = _projection(graph, reshape.args[0])
    if made is None or made[1] != 0:
        return None
    weight, _, bias = made
    if graph.shapes.get(weight, (0,))[0] != parts * heads * d:
        return None
    return HeadRows(weight, bias, 0, item.args[1] * heads * d, heads, d), tuple(sizes[:2])
