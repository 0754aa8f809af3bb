"""Attention's value heads: where an orthogonal map of each head's value dims keeps the model's
function, found on the traced graph.

An attention call mixes value vectors only along the sequence (``softmax(...) @ v``, per
head), and the output projection reads each head's ``d`` dims as columns of its weight. So an
orthogonal ``M`` per value head, applied to the rows of the value projection (``v -> M v``) and,
as ``M^T``, to the columns of the output projection that read that head (every query head
sharing it under grouped-query attention), leaves the output unchanged. Permutations move only
some of these maps; a :class:`ValueSite` records a place where all of them may act: an
attention call whose value is, exactly,

* ``linear(x, W, b?)`` -> ``view(B, T, kv_heads, d)`` -> ``transpose(1, 2)``, used by nothing
  else, at most repeated for grouped-query attention (``unsqueeze(2)``, ``expand``,
  ``reshape``) or passed with ``enable_gqa``, and not also the query or key;
* and whose output reaches only a linear layer (weight used nowhere else) through no-op
  reshapes, ``contiguous`` and casts, ``transpose(1, 2)`` and one reshape that merges the last
  two axes ``(heads, d)`` into the layer's input (checked on the traced shapes, or on the
  reshape's own arguments where the graph has none).

Anything else (fused qkv projections, a value kept in a cache, attention weights returned, an
output read elsewhere) is not a site: those dims move only by permutations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from .attention import attention_sites, head_projection, linear_params, readers, unrepeat
from .graph import PermutationGraph
from .orthogonal import kind_of
from .rules._util import arg

__all__ = ["ValueSite", "value_sites", "turn_values"]

_PASS = {"contiguous", "to", "_to_copy", "clone", "type_as", "float", "double", "half"}
_RESHAPE = {"view", "reshape", "_unsafe_view"}


@dataclass(frozen=True)
class ValueSite:
    """One attention call's value projection (weight, bias or None, ``kv_heads`` heads of
    ``head_dim`` dims) and output projection weight ``out`` (reading ``heads`` query heads);
    ``node`` is the attention call."""

    value: str
    value_bias: str | None
    out: str
    heads: int
    kv_heads: int
    head_dim: int
    node: str

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


def turn_values(t: torch.Tensor, m: torch.Tensor, site: ValueSite, tensor: str) -> torch.Tensor:
    """``tensor`` of ``site`` (its value weight or bias, or output weight) with value head ``j``
    turned by ``m[j]`` (``[kv_heads, d, d]``), in ``t``'s dtype."""
    work = torch.float64 if t.dtype == torch.float64 else torch.float32
    m = m.to(device=t.device, dtype=work)
    kv, d = site.kv_heads, site.head_dim
    if tensor == site.out:  # columns: query head h reads value head h // (heads / kv)
        cols = t.to(work).reshape(t.shape[0], kv, site.heads // kv, d)
        return torch.einsum("okrq,kpq->okrp", cols, m).reshape(t.shape).to(t.dtype)
    rows = t.to(work).reshape(kv, d, -1)
    return torch.einsum("kpq,kqz->kpz", m, rows).reshape(t.shape).to(t.dtype)


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
    proj = head_projection(graph, v)  # v is then transpose(view(linear))
    out = _output(sdpa, _sizes(v.args[0])[:2]) if proj is not None else None
    if out is None:
        return None
    value, bias, kv_heads, d = proj
    weight, width = out
    if width % d or (width // d) % kv_heads or graph.shapes.get(weight, (0, 0))[1] != width:
        return None
    if any(uses.get(t, 0) != 1 for t in (value, bias, weight) if t is not None):
        return None  # a projection shared with another site or op
    return ValueSite(value, bias, weight, width // d, kv_heads, d, sdpa.name)


def _output(sdpa: fx.Node, batch_and_time: tuple) -> tuple[str, int] | None:
    """(weight, input width) of the linear layer that alone reads ``sdpa``'s output
    ``[B, heads, T, d]`` as ``[B, T, heads * d]``; ``batch_and_time``: the value's view's
    first two sizes as written."""
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
    if merged is None or len(readers(user)) != 1:
        return None
    (linear,) = readers(user)
    params = linear_params(linear)
    if params is None or linear.args[0] is not user:
        return None
    return params[0], merged


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
