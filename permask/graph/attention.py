"""The projections of an attention call, read from the traced graph: which linear layer makes a
query, key or value's heads, and grouped-query attention's repeat of a key or value head.

Shared by the sites where maps beyond permutations act inside attention: RoPE's frequency
planes (:mod:`permask.graph.rope`) and each head's value dims (:mod:`permask.graph.values`).
Every helper answers None for a pattern it does not know: such a site is not found, and its
dims stay as permutations leave them.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .graph import PermutationGraph
from .orthogonal import _NO_VALUE, kind_of, tensor_uses
from .rules._util import arg

_SHAPE_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad"}
RESHAPE = {"view", "reshape", "_unsafe_view"}  #: the ops that reshape without moving values

__all__ = [
    "attention_sites",
    "head_dim",
    "head_projection",
    "linear_params",
    "readers",
    "same_size",
    "sizes_of",
    "shape_of",
    "unrepeat",
    "RESHAPE",
]


def attention_sites(graph: PermutationGraph, site_of) -> list:
    """``site_of(graph, node, uses)`` for every attention call (``scaled_dot_product_attention``)
    of ``graph``, in order, where it is not None (``uses``: :func:`tensor_uses`)."""
    uses = tensor_uses(graph)
    out = []
    for node in graph.fx_graph.nodes:
        if kind_of(node) == "scaled_dot_product_attention":
            site = site_of(graph, node, uses)
            if site is not None:
                out.append(site)
    return out


def readers(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` that read its values, not only its shape (``x.shape``, ``x.size()``,
    export's metadata asserts); ``x.mT`` or ``x.data`` read values."""
    return [u for u in node.users if not _shape_only(u)]


def _shape_only(user: fx.Node) -> bool:
    kind = kind_of(user)
    if kind == "getattr":
        return len(user.args) > 1 and user.args[1] in _SHAPE_ATTRIBUTES
    return kind in _NO_VALUE


def linear_params(linear: fx.Node) -> tuple[str, str | None] | None:
    """(weight, bias or None) of a linear layer, called as a function on the model's tensors
    (``torch.export``) or as an ``nn.Linear`` module (``torch.fx``); None for anything else."""
    if kind_of(linear) != "linear":
        return None
    if linear.op == "call_module":
        module = linear.graph.owning_module.get_submodule(linear.target)
        bias = f"{linear.target}.bias" if module.bias is not None else None
        return f"{linear.target}.weight", bias
    params = [a for a in linear.args[1:] if isinstance(a, fx.Node)]
    params += [v for k, v in linear.kwargs.items() if k in ("weight", "bias") and v is not None]
    if not params or any(p.op != "get_attr" for p in params):
        return None
    return params[0].target, params[1].target if len(params) > 1 else None


def head_dim(x: fx.Node) -> int | None:
    """The head dim of ``x = transpose(view(linear, [B, T, H, d]), 1, 2)``, if it is that."""
    if kind_of(x) != "transpose" or tuple(x.args[1:3]) not in ((1, 2), (2, 1)):
        return None
    view = x.args[0]
    shape = sizes_of(view)
    if kind_of(view) not in RESHAPE or len(shape) != 4:
        return None
    d = shape[3]
    return d if isinstance(d, int) and d > 0 else None


def head_projection(graph: PermutationGraph, x: fx.Node) -> tuple[str, str | None, int, int] | None:
    """(weight, bias, heads, head dim) of the linear layer under ``x`` (see :func:`head_dim`),
    when that layer and its view feed nothing else."""
    d = head_dim(x)
    if d is None:
        return None
    view = x.args[0]
    linear = view.args[0]
    params = linear_params(linear) if isinstance(linear, fx.Node) else None
    if params is None or len(readers(linear)) != 1 or len(readers(view)) != 1:
        return None
    weight, bias = params
    rows = graph.shapes.get(weight, (0,))[0]
    if rows % d:
        return None
    return weight, bias, rows // d, d


def unrepeat(x: fx.Node) -> fx.Node | None:
    """A key or value before grouped-query attention's repeat (``unsqueeze(2)`` ->
    ``expand(B, kv, r, T, d)`` -> ``reshape(B, kv * r, T, d)``: query head ``h`` reads head
    ``h // r``), or ``x`` when it is not repeated; None for another pattern."""
    if kind_of(x) not in RESHAPE:
        return x
    e = x.args[0] if x.args else None
    if not isinstance(e, fx.Node) or kind_of(e) != "expand" or len(readers(e)) != 1:
        return None
    u = e.args[0] if e.args else None
    if not isinstance(u, fx.Node) or kind_of(u) != "unsqueeze" or len(readers(u)) != 1:
        return None
    if arg(u.args, u.kwargs, 1, "dim") != 2:
        return None
    return u.args[0] if _merges_kv_and_repeats(e, x) else None


def _merges_kv_and_repeats(expand: fx.Node, reshape: fx.Node) -> bool:
    """Whether ``reshape`` merges exactly axes 1 and 2 of ``expand``'s 5-D output: checked on
    the traced shapes, or on the sizes as written (the same batch, positions and head dim)."""
    a, b = shape_of(expand), shape_of(reshape)
    if a is not None and b is not None:
        return len(a) == 5 and b == (a[0], a[1] * a[2], a[3], a[4])
    sizes_e, sizes_r = sizes_of(expand), sizes_of(reshape)
    if len(sizes_e) != 5 or len(sizes_r) != 4:
        return False
    return all(same_size(sizes_r[i], sizes_e[j]) for i, j in ((0, 0), (2, 3), (3, 4)))


def same_size(a, b) -> bool:
    """Whether two sizes as written are one: the same fx node, or the same positive int (a -1
    is never known to be anything)."""
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return a is b
    return isinstance(a, int) and isinstance(b, int) and a == b > 0


def sizes_of(view: fx.Node) -> tuple:
    """The sizes a view, reshape or expand was called with (one list or several arguments)."""
    sizes = view.args[1] if len(view.args) == 2 else view.args[1:]
    return tuple(sizes) if isinstance(sizes, (list, tuple)) else ()


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    """The traced shape of ``node`` (``torch.export`` records it), or None."""
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None
