"""Attention's value heads: where an orthogonal map of each head's value dims keeps the model's
function, found on the traced graph.

An attention call mixes value vectors only along the sequence (``softmax(...) @ v``, per
head), and the output projection reads each head's ``d`` dims as columns of its weight. So an
orthogonal ``M`` per value head, applied to the value projection's rows (``v -> M v``) and, as
``M^T``, to the output projection's columns that read that head (every query head sharing it
under grouped-query attention), leaves the output unchanged. Permutations move only some of
these maps; a :class:`ValueSite` records a place where all of them may act: an attention call
whose value is made by one of the patterns of :mod:`permask.graph.heads` (own or fused
projections), used by nothing else, at most repeated for grouped-query attention
(``unsqueeze(2)``, ``expand``, ``reshape``) or passed with ``enable_gqa``, and not also the query
or key; and whose output reaches only a linear layer (or ``addmm`` on its ``view(-1, C)``;
weight used nowhere else) through no-op reshapes, ``contiguous``, casts and identity modules,
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

from .attention import (
    RESHAPE,
    attention_sites,
    linear_params,
    readers,
    same_size,
    shape_of,
    sizes_of,
    unrepeat,
)  # fmt: skip
from .graph import PermutationGraph
from .heads import HeadRows, head_rows
from .orthogonal import kind_of, work_dtype
from .rules._util import arg

__all__ = ["ValueSite", "value_sites", "value_heads", "turn_values"]

_PASS = {"contiguous", "to", "_to_copy", "clone", "type_as", "float", "double", "half",
         "identity"}  # fmt: skip


@dataclass(frozen=True)
class ValueSite:
    """One attention call's value rows (:class:`HeadRows`: ``kv_heads`` heads of ``head_dim``
    dims) and the output projection weight ``out``, reading ``heads`` query heads along its axis
    ``out_axis``. ``node`` is the attention call."""

    rows: HeadRows
    out: str
    out_axis: int
    heads: int
    node: str

    value = property(lambda self: self.rows.weight, doc="The value projection's weight.")
    value_bias = property(lambda self: self.rows.bias, doc="Its bias, or None.")
    kv_heads = property(lambda self: self.rows.heads, doc="Value heads.")
    head_dim = property(lambda self: self.rows.head_dim, doc="Dims per head.")

    @property
    def name(self) -> str:
        """The key of this site's maps: ``value:`` and the value weight's name."""
        return f"value:{self.value}"

    @property
    def tensors(self) -> list[str]:
        """The tensors its maps move: the value projection's weight and bias, the output's
        weight."""
        return [*self.rows.tensors, self.out]

    def turn(self, t: torch.Tensor, m: torch.Tensor, tensor: str) -> torch.Tensor:
        """:func:`turn_values` of ``tensor``."""
        return turn_values(t, m, self, tensor)


def value_sites(graph: PermutationGraph) -> list[ValueSite]:
    """Every attention call of ``graph`` whose value heads may be turned."""
    return attention_sites(graph, _site)


def value_heads(t: torch.Tensor, site: ValueSite, tensor: str) -> torch.Tensor:
    """``tensor`` of ``site`` as its value heads: the value weight or bias as
    ``[kv_heads, d, rest]``, the output weight as ``[rest, kv_heads, heads / kv_heads, d]``."""
    if tensor != site.out:
        return site.rows.view(t, tensor)
    cols = t.movedim(site.out_axis, 1)
    return cols.reshape(cols.shape[0], site.kv_heads, site.heads // site.kv_heads, site.head_dim)


def turn_values(t: torch.Tensor, m: torch.Tensor, site: ValueSite, tensor: str) -> torch.Tensor:
    """``tensor`` of ``site`` (its value weight or bias, or output weight) with value head ``j``
    turned by ``m[j]`` (``[kv_heads, d, d]``): rows ``v -> M v``, columns by ``M^T``; in ``t``'s
    dtype, differentiable in ``t`` and ``m``."""
    if tensor != site.out:
        return site.rows.turn(t, m, tensor)
    work = work_dtype(t)
    heads = value_heads(t.to(work), site, tensor)  # query head h reads value head h // (H / kv)
    turned = torch.einsum("okrq,kpq->okrp", heads, m.to(device=t.device, dtype=work))
    moved = t.movedim(site.out_axis, 1)
    return turned.reshape(moved.shape).movedim(1, site.out_axis).to(t.dtype)


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
    found = head_rows(graph, v)
    out = _output(sdpa, found[1]) if found is not None else None
    if out is None:
        return None
    rows = found[0]
    weight, out_axis, width = out
    d = rows.head_dim
    if (
        width % d
        or (width // d) % rows.heads
        or graph.shapes.get(weight, ())[out_axis:][:1] != (width,)
    ):
        return None
    if any(uses.get(t, 0) != 1 for t in (*rows.tensors, weight)):
        return None  # a projection shared with another site or op
    return ValueSite(rows, weight, out_axis, width // d, sdpa.name)


def _output(sdpa: fx.Node, batch_and_time: tuple) -> tuple[str, int, int] | None:
    """(weight, its axis of the input features, input width) of the linear layer that alone
    reads ``sdpa``'s output ``[B, heads, T, d]`` as ``[B, T, heads * d]``; ``batch_and_time``:
    the value's first two sizes as written."""
    node, moved = sdpa, False
    while True:
        users = readers(node)
        if len(users) != 1 or users[0].args[:1] != (node,):
            return None
        user, kind = users[0], kind_of(users[0])
        if kind in _PASS or (kind in RESHAPE and shape_of(user) is not None and
                             shape_of(user) == shape_of(node)):  # fmt: skip
            node = user
        elif kind == "transpose" and not moved and tuple(user.args[1:3]) in ((1, 2), (2, 1)):
            node, moved = user, True
        elif kind in RESHAPE and moved:
            break
        else:
            return None
    merged = _merged_width(node, user, batch_and_time)
    while merged is not None and len(readers(user)) == 1 and kind_of(readers(user)[0]) in _PASS:
        if readers(user)[0].args[:1] != (user,):  # other.type_as(y) holds other's values
            return None
        user = readers(user)[0]  # an identity module (timm's attention norm), a cast
    if merged is None or len(readers(user)) != 1:
        return None
    (linear,) = readers(user)
    if kind_of(linear) in RESHAPE and sizes_of(linear)[-1:] == (merged,):  # view(-1, C), addmm
        flat = linear
        (mm,) = readers(flat) if len(readers(flat)) == 1 else (None,)
        if mm is None or kind_of(mm) != "addmm" or mm.args[1:2] != (flat,) or flat in mm.args[2:]:
            return None
        w = mm.args[2]
        return (w.target, 0, merged) if isinstance(w, fx.Node) and w.op == "get_attr" else None
    params = linear_params(linear)
    if params is None or linear.args[:1] != (user,):
        return None
    return params[0], 1, merged


def _merged_width(before: fx.Node, reshape: fx.Node, batch_and_time: tuple) -> int | None:
    """The width of the last axis of ``reshape`` when it merges exactly the last two axes of
    ``before`` (``[B, T, heads, d]`` to ``[B, T, heads * d]``): checked on the traced shapes,
    or, where the graph has none, by its first two sizes being the value view's own."""
    a, b = shape_of(before), shape_of(reshape)
    if a is not None and b is not None:
        return b[-1] if len(a) == 4 and b == (*a[:2], a[2] * a[3]) else None
    shape = sizes_of(reshape)
    if len(shape) != 3 or len(batch_and_time) != 2:
        return None
    if not all(same_size(a, b) for a, b in zip(shape[:2], batch_and_time)):
        return None
    return shape[2] if isinstance(shape[2], int) and shape[2] > 0 else None
