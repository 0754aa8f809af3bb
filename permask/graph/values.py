"""Attention's value heads: where an orthogonal map of each head's value dims keeps the model's
function, found on the traced graph.

An attention call mixes value vectors only along the sequence (``softmax(...) @ v``, per
head), and the output projection reads each head's ``d`` dims as columns of its weight. So an
orthogonal ``M`` per value head, applied to the value projection's rows (``v -> M v``) and, as
``M^T``, to the output projection's columns that read that head (every query head sharing it
under grouped-query attention), leaves the output unchanged. Permutations move only some of
these maps; a :class:`ValueSite` records a place where all of them may act: an attention call
whose value is, exactly, one of

* ``linear(x, W, b?)`` -> ``view(B, T, kv_heads, d)`` -> ``transpose(1, 2)`` (Llama, BERT);
* the same with the value one part of a fused projection split along its last dim
  (``split`` -> ``getitem``), the projection a linear layer or ``addmm`` on ``view(x, [-1, C])``
  (GPT-2's ``Conv1D``, whose weight holds the rows as columns);
* ``linear`` -> ``reshape(B, T, 3, heads, d)`` -> ``permute(2, 0, 3, 1, 4)`` -> ``unbind(0)``
  and its item 2 (timm's fused qkv);

used by nothing else, at most repeated for grouped-query attention (``unsqueeze(2)``,
``expand``, ``reshape``) or passed with ``enable_gqa``, and not also the query or key; and
whose output reaches only a linear layer (or ``addmm`` on its ``view(-1, C)``; weight used
nowhere else) through no-op reshapes, ``contiguous``, casts and identity modules,
``transpose(1, 2)`` and one reshape that merges the last two axes ``(heads, d)`` (checked on the
traced shapes, or, where the graph has none, by the reshape's first two sizes being those the
value was made with).

Anything else (a value kept in a cache, attention weights returned, an output read elsewhere)
is not a site: those dims move only by permutations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from .attention import attention_sites, linear_params, readers, unrepeat
from .graph import PermutationGraph
from .orthogonal import kind_of
from .rules._util import arg

__all__ = ["ValueSite", "value_sites", "value_heads", "turn_values"]

_PASS = {"contiguous", "to", "_to_copy", "clone", "type_as", "float", "double", "half",
         "identity"}  # fmt: skip
_RESHAPE = {"view", "reshape", "_unsafe_view"}


@dataclass(frozen=True)
class ValueSite:
    """One attention call's value rows: ``kv_heads`` heads of ``head_dim`` dims, from
    ``start`` on along axis ``value_axis`` of the projection weight ``value`` (and its bias, or
    None, along axis 0); and the output projection weight ``out``, reading ``heads`` query heads
    along its axis ``out_axis``. ``node`` is the attention call."""

    value: str
    value_bias: str | None
    out: str
    heads: int
    kv_heads: int
    head_dim: int
    node: str
    value_axis: int = 0
    start: int = 0
    out_axis: int = 1

    @property
    def name(self) -> str:
        """The key of this site's maps: ``value:`` and the value weight's name."""
        return f"value:{self.value}"

    @property
    def tensors(self) -> list[str]:
        """The tensors its maps move: the value projection's weight and bias, the output's
        weight."""
        return [t for t in (self.value, self.value_bias, self.out) if t is not None]


def value_sites(graph: PermutationGraph) -> list[ValueSite]:
    """Every attention call of ``graph`` whose value heads may be turned."""
    return attention_sites(graph, _site)


def value_heads(t: torch.Tensor, site: ValueSite, tensor: str) -> torch.Tensor:
    """``tensor`` of ``site`` as its value heads: the value weight or bias as
    ``[kv_heads, d, rest]``, the output weight as ``[rest, kv_heads, heads / kv_heads, d]``."""
    kv, d = site.kv_heads, site.head_dim
    if tensor == site.out:
        cols = t.movedim(site.out_axis, 1)
        return cols.reshape(cols.shape[0], kv, site.heads // kv, d)
    axis = site.value_axis if tensor == site.value else 0
    return t.narrow(axis, site.start, kv * d).movedim(axis, 0).reshape(kv, d, -1)


def turn_values(t: torch.Tensor, m: torch.Tensor, site: ValueSite, tensor: str) -> torch.Tensor:
    """``tensor`` of ``site`` (its value weight or bias, or output weight) with value head ``j``
    turned by ``m[j]`` (``[kv_heads, d, d]``): rows ``v -> M v``, columns by ``M^T``; in ``t``'s
    dtype, differentiable in ``t`` and ``m``."""
    work = torch.float64 if t.dtype == torch.float64 else torch.float32
    m = m.to(device=t.device, dtype=work)
    heads = value_heads(t.to(work), site, tensor)
    if tensor == site.out:  # query head h reads value head h // (heads / kv)
        turned = torch.einsum("okrq,kpq->okrp", heads, m)
        moved = t.movedim(site.out_axis, 1)
        return turned.reshape(moved.shape).movedim(1, site.out_axis).to(t.dtype)
    axis = site.value_axis if tensor == site.value else 0
    width = site.kv_heads * site.head_dim
    block = t.narrow(axis, site.start, width).movedim(axis, 0)
    rows = torch.einsum("kpq,kqz->kpz", m, heads).reshape(block.shape).movedim(0, axis)
    after = t.shape[axis] - site.start - width
    parts = [t.narrow(axis, 0, site.start).to(work), rows, t.narrow(axis, site.start + width,
                                                                  after).to(work)]  # fmt: skip
    return torch.cat(parts, axis).to(t.dtype)


def _site(graph: PermutationGraph, sdpa: fx.Node, uses: dict[str, int]) -> ValueSite | None:
    v = arg(sdpa.args, sdpa.kwargs, 2, "value")
    if not isinstance(v, fx.Node) or len(readers(v)) != 1:
        return None
    operands = [*sdpa.args, *sdpa.kwargs.values()]
    if operands.count(v) != 1:
        return None  # the value is also the query, key or a mask
    v = unrepeat(v)
    if v is None or len(readers(v)) != 1:
        return None
    rows = _value_rows(graph, v)
    out = _output(sdpa, rows[-1]) if rows is not None else None
    if out is None:
        return None
    value, axis, start, bias, kv_heads, d, _ = rows
    weight, out_axis, width = out
    if (
        width % d
        or (width // d) % kv_heads
        or graph.shapes.get(weight, ())[out_axis:][:1] != (width,)
    ):
        return None
    if any(uses.get(t, 0) != 1 for t in (value, bias, weight) if t is not None):
        return None  # a projection shared with another site or op
    return ValueSite(value, bias, weight, width // d, kv_heads, d, sdpa.name, axis, start, out_axis)


def _value_rows(graph: PermutationGraph, v: fx.Node):
    """(weight, its axis of the rows, the rows' start, bias, kv heads, d, the value's first two
    sizes as written) of the projection making ``v`` (module docstring), or None."""
    if kind_of(v) == "getitem":  # timm: unbind(permute(reshape(linear, [B, T, 3, H, d])))[2]
        return _fused_heads(graph, v)
    if kind_of(v) != "transpose" or tuple(v.args[1:3]) not in ((1, 2), (2, 1)):
        return None
    view = v.args[0]
    sizes = _sizes(view)
    if kind_of(view) not in _RESHAPE or len(sizes) != 4 or len(readers(view)) != 1:
        return None
    d, x, start = sizes[3], view.args[0], 0
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
    kv, shape = width // d, _shape(view)  # the view splits only the last dim: (heads, d)
    if (shape is not None and shape[2:] != (kv, d)) or (shape is None and sizes[2] != kv):
        return None
    return weight, axis, start, bias, kv, d, tuple(sizes[:2])


def _split_part(item: fx.Node) -> tuple[fx.Node | None, int, int]:
    """(the split tensor, the part's start, its width) for ``split(x, size, -1)[i]`` along the
    last dim, the part read by nothing else; (None, 0, 0) otherwise."""
    split = item.args[0]
    if kind_of(split) not in ("split", "split_with_sizes") or not isinstance(item.args[1], int):
        return None, 0, 0
    x, sizes = split.args[0], arg(split.args, split.kwargs, 1, "split_size")
    dim = arg(split.args, split.kwargs, 2, "dim", 0)
    ndim = len(_sizes(x)) if kind_of(x) in _RESHAPE else None
    if dim != -1 and (ndim is None or dim != ndim - 1):
        return None, 0, 0
    i = item.args[1]
    if isinstance(sizes, int):
        start, width = i * sizes, sizes
    elif isinstance(sizes, (list, tuple)) and all(isinstance(n, int) for n in sizes):
        start, width = sum(sizes[:i]), sizes[i]
    else:
        return None, 0, 0
    if len(readers(x)) != 1 or len(readers(item)) != 1:
        return None, 0, 0
    return x, start, width


def _projection(graph: PermutationGraph, x: fx.Node) -> tuple[str, int, str | None] | None:
    """(weight, its axis of the output features, bias) of the linear layer making ``x`` and
    feeding nothing else: ``linear``, or ``view(addmm(b, view(h, [-1, C]), W), ...)``."""
    if len(readers(x)) != 1:
        return None
    if kind_of(x) in _RESHAPE and kind_of(x.args[0]) == "addmm":
        mm = x.args[0]
        if len(readers(mm)) != 1 or not all(isinstance(a, fx.Node) and a.op == "get_attr"
                                            for a in (mm.args[0], mm.args[2])):  # fmt: skip
            return None
        columns = graph.shapes.get(mm.args[2].target, (0, 0))[1]
        return (mm.args[2].target, 1, mm.args[0].target) if _sizes(x)[-1:] == (columns,) else None
    params = linear_params(x)
    return None if params is None else (params[0], 0, params[1])


def _fused_heads(graph: PermutationGraph, item: fx.Node):
    """:func:`_value_rows` for timm's ``unbind(permute(reshape(linear, [B, T, 3, H, d]),
    [2, 0, 3, 1, 4]))[2]``."""
    unbind = item.args[0]
    if kind_of(unbind) != "unbind" or arg(unbind.args, unbind.kwargs, 1, "dim", 0) != 0:
        return None
    permute = unbind.args[0]
    dims = permute.args[1] if len(permute.args) == 2 else permute.args[1:]
    if kind_of(permute) != "permute" or tuple(dims) != (2, 0, 3, 1, 4):
        return None
    reshape = permute.args[0]
    sizes = _sizes(reshape)
    if kind_of(reshape) not in _RESHAPE or len(sizes) != 5 or not isinstance(item.args[1], int):
        return None
    parts, heads, d = sizes[2:]
    if not all(isinstance(n, int) and n > 0 for n in (parts, heads, d)):
        return None
    if any(len(readers(n)) != 1 for n in (reshape, permute)):
        return None
    made = _projection(graph, reshape.args[0])
    if made is None or made[1] != 0:
        return None
    weight, _, bias = made
    if graph.shapes.get(weight, (0,))[0] != parts * heads * d:
        return None
    return weight, 0, item.args[1] * heads * d, bias, heads, d, tuple(sizes[:2])


def _output(sdpa: fx.Node, batch_and_time: tuple) -> tuple[str, int, int] | None:
    """(weight, its axis of the input features, input width) of the linear layer that alone
    reads ``sdpa``'s output ``[B, heads, T, d]`` as ``[B, T, heads * d]``; ``batch_and_time``:
    the value's first two sizes as written."""
    node, moved = sdpa, False
    while True:
        users = readers(node)
        if len(users) != 1 or users[0].args[0] is not node:
            return None
        user, kind = users[0], kind_of(users[0])
        if kind in _PASS or (kind in _RESHAPE and _shape(user) is not None and
                             _shape(user) == _shape(node)):  # fmt: skip
            node = user
        elif kind == "transpose" and not moved and tuple(user.args[1:3]) in ((1, 2), (2, 1)):
            node, moved = user, True
        elif kind in _RESHAPE and moved:
            break
        else:
            return None
    merged = _merged_width(node, user, batch_and_time)
    while merged is not None and len(readers(user)) == 1 and kind_of(readers(user)[0]) in _PASS:
        user = readers(user)[0]  # an identity module (timm's attention norm), a cast
    if merged is None or len(readers(user)) != 1:
        return None
    (linear,) = readers(user)
    if kind_of(linear) in _RESHAPE and _sizes(linear)[-1:] == (merged,):  # view(-1, C), addmm
        flat = linear
        (mm,) = readers(flat) if len(readers(flat)) == 1 else (None,)
        if mm is None or kind_of(mm) != "addmm" or mm.args[1] is not flat or flat in mm.args[2:]:
            return None
        w = mm.args[2]
        return (w.target, 0, merged) if isinstance(w, fx.Node) and w.op == "get_attr" else None
    params = linear_params(linear)
    if params is None or linear.args[0] is not user:
        return None
    return params[0], 1, merged


def _merged_width(before: fx.Node, reshape: fx.Node, batch_and_time: tuple) -> int | None:
    """The width of the last axis of ``reshape`` when it merges exactly the last two axes of
    ``before`` (``[B, T, heads, d]`` to ``[B, T, heads * d]``): checked on the traced shapes,
    or, where the graph has none, by its first two sizes being the value view's own."""
    a, b = _shape(before), _shape(reshape)
    if a is not None and b is not None:
        return b[-1] if len(a) == 4 and b == (*a[:2], a[2] * a[3]) else None
    shape = _sizes(reshape)
    if len(shape) != 3 or tuple(shape[:2]) != tuple(batch_and_time):
        return None
    return shape[2] if isinstance(shape[2], int) and shape[2] > 0 else None


def _sizes(view: fx.Node) -> tuple:
    """The sizes a view or reshape was called with (one list or several arguments)."""
    sizes = view.args[1] if len(view.args) == 2 else view.args[1:]
    return tuple(sizes) if isinstance(sizes, (list, tuple)) else ()


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None
