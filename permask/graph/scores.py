"""Which output channels of a node reach the query or key of an attention score:
:func:`score_channels`.

Such channels only ever meet as dot products ``q . k`` inside a softmax, so a per-channel
affine correction (REPAIR, :mod:`permask.repair`) changes the attention pattern instead of
restoring a statistic. The walk follows the node's users through ops that move or combine
values without mixing channels (views, transposes, splits, slices, elementwise arithmetic,
RoPE's rotate-half), and records the channels that arrive as the query or key of
``scaled_dot_product_attention``, or as either side of a matmul whose product goes to a
softmax. It stops at anything else (another layer, a norm, a nonlinearity, a reduction).

Channels are tracked as one range of the node's last dim while they stay on the last dim with
their order (a split or slice of the last dim narrows it, as Hugging Face's GPT-2 splits its
fused ``c_attn`` into q, k and v). After an op that may move or regroup them (a reshape of the
last dim into heads, a transpose of it, a graph without shapes) the whole current range counts:
wrong only towards reporting more channels than truly reach a score.

>>> import torch, permask
>>> class Attention(torch.nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.qkv, self.out = torch.nn.Linear(8, 24), torch.nn.Linear(8, 8)
...     def forward(self, x):
...         q, k, v = self.qkv(x).split(8, dim=-1)
...         y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
...         return self.out(y)
>>> graph = permask.trace(Attention(), torch.randn(2, 5, 8))
>>> qkv = next(n for n in graph.fx_graph.nodes if n.target == "qkv")
>>> score_channels(qkv, 24).nonzero().flatten().tolist() == list(range(16))
True
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

__all__ = ["score_channels"]

_ATTENTION = {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
              "_scaled_dot_product_efficient_attention"}  # fmt: skip
_MATMUL = {"matmul", "bmm", "__matmul__"}
_SOFTMAX = {"softmax", "_softmax", "log_softmax"}
_SPLIT = {"split", "split_with_sizes", "chunk", "tensor_split"}
_SAME_ORDER = {"add", "sub", "mul", "div", "neg", "to", "_to_copy", "type", "float", "half",
               "bfloat16", "contiguous", "clone", "dropout", "alias", "detach", "masked_fill",
               "where", "expand", "repeat_interleave", "identity"}  # fmt: skip
_REGROUP = {"view", "reshape", "_unsafe_view", "transpose", "permute", "flatten", "unflatten",
            "unsqueeze", "squeeze", "cat", "concat", "slice", "select", "unbind", "movedim",
            "swapaxes", "t", "repeat", "getitem"}  # fmt: skip
_SCALE = {"add", "sub", "mul", "div", "masked_fill", "where", "to", "_to_copy", "type", "float"}


def score_channels(node: fx.Node, channels: int, last_dim: bool = True) -> torch.Tensor:
    """Bool ``[channels]``: which of ``node``'s output channels reach the query or key of an
    attention score (see the module docstring). ``last_dim=False``: the channels are on
    another dim (a conv's dim 1), so a score reached by any of them counts for all."""
    hits = torch.zeros(channels, dtype=torch.bool)
    todo = [(node, 0, channels, last_dim)]
    seen: set[tuple] = set()
    while todo:
        cur, lo, hi, exact = todo.pop()
        if (cur, lo, hi, exact) in seen:
            continue
        seen.add((cur, lo, hi, exact))
        for user in cur.users:
            todo += _follow(cur, user, lo, hi, exact, hits)
    return hits


def _follow(cur: fx.Node, user: fx.Node, lo: int, hi: int, exact: bool, hits: torch.Tensor):
    """Where the channels ``lo:hi`` of ``cur`` go in ``user``: marked in ``hits``, or the
    nodes (with their channel range) to walk on."""
    op = _name(user)
    args = list(user.args)
    if op in _ATTENTION:
        if _position(user, cur) in (0, 1):
            hits[lo:hi] = True
        return []
    if op in _MATMUL:
        if _position(user, cur) in (0, 1) and _reaches_softmax(user):
            hits[lo:hi] = True
        return []
    if op in _SPLIT:
        return _split(cur, user, lo, hi, exact)
    if op == "slice" and exact and _is_last(cur, args[1] if len(args) > 1 else 0):
        start, end = (list(args[2:4]) + [None, None])[:2]
        new_lo = lo + max(0, int(start or 0))
        new_hi = min(hi, lo + int(end)) if isinstance(end, int) else hi
        return [(user, new_lo, max(new_lo, new_hi), True)]
    if op in _SAME_ORDER:
        return [(user, lo, hi, exact)]
    if op in _REGROUP:
        return [(user, lo, hi, exact and _keeps_last(cur, user, op, args))]
    return []


def _split(cur: fx.Node, user: fx.Node, lo: int, hi: int, exact: bool) -> list[tuple]:
    """Each item of a split: its share of ``lo:hi`` when the last dim is split exactly."""
    args, kwargs = list(user.args), user.kwargs
    dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
    sizes = args[1] if len(args) > 1 else kwargs.get("split_size_or_sections")
    width = hi - lo
    bounds = None
    if exact and _is_last(cur, dim) and _name(user) != "tensor_split":
        if isinstance(sizes, int) and _name(user) == "chunk":
            sizes = -(-width // sizes)
        if isinstance(sizes, int) and sizes > 0:
            sizes = [sizes] * (-(-width // sizes))
        if isinstance(sizes, (list, tuple)) and all(isinstance(s, int) for s in sizes):
            starts = [lo + sum(sizes[:i]) for i in range(len(sizes))]
            bounds = [(s, min(hi, s + n)) for s, n in zip(starts, sizes)]
    out = []
    for item in user.users:
        if _name(item) != "getitem" or not isinstance(item.args[1], int):
            out.append((item, lo, hi, False))
        elif bounds is not None and item.args[1] < len(bounds):
            out.append((item, *bounds[item.args[1]], True))
        else:
            out.append((item, lo, hi, False))
    return out


def _reaches_softmax(node: fx.Node, depth: int = 6) -> bool:
    """Whether ``node``'s value goes to a softmax through a few scalings or masks."""
    for user in node.users:
        op = _name(user)
        if op in _SOFTMAX or (depth and op in _SCALE and _reaches_softmax(user, depth - 1)):
            return True
    return False


def _name(node: fx.Node) -> str:
    """The op a node applies, by one name for fx and export graphs (``aten.view.default``,
    ``Tensor.view`` and ``torch.reshape`` alike)."""
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        if node.target is operator.getitem:
            return "getitem"
        if node.target is operator.matmul:
            return "matmul"
        if node.target in (operator.add, operator.iadd):
            return "add"
        if node.target in (operator.mul, operator.imul):
            return "mul"
        if node.target in (operator.truediv, operator.sub, operator.neg):
            return {operator.truediv: "div", operator.sub: "sub", operator.neg: "neg"}[node.target]
        return str(getattr(node.target, "_opname", None) or getattr(node.target, "__name__", ""))
    if node.op == "call_module":  # identity-like modules pass values on (timm's q_norm default)
        module = node.graph.owning_module.get_submodule(str(node.target))
        return {"Identity": "identity", "Dropout": "dropout"}.get(type(module).__name__, "module")
    return node.op


def _position(user: fx.Node, arg: fx.Node) -> int | None:
    for i, a in enumerate(user.args):
        if a is arg:
            return i
    keys = {"query": 0, "key": 1, "value": 2, "input": 0, "other": 1}
    return next((keys.get(k) for k, a in user.kwargs.items() if a is arg), None)


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = getattr(node, "meta", {})
    for key in ("val", "tensor_meta"):
        shape = getattr(meta.get(key), "shape", None)
        if shape is not None:
            return tuple(shape)
    return None


def _is_last(node: fx.Node, dim: Any) -> bool:
    shape = _shape(node)
    return isinstance(dim, int) and (dim == -1 or (shape is not None and dim == len(shape) - 1))


def _keeps_last(cur: fx.Node, user: fx.Node, op: str, args: list) -> bool:
    """Whether ``user`` keeps ``cur``'s last dim as its last dim, in order (known shapes)."""
    before, after = _shape(cur), _shape(user)
    if before is None or after is None or not before or not after or before[-1] != after[-1]:
        return False
    if op in ("transpose", "swapaxes", "movedim"):
        return not any(_is_last(cur, d) for d in args[1:3])
    if op == "permute":
        dims = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
        return bool(dims) and dims[-1] in (-1, len(before) - 1)
    return op in ("view", "reshape", "_unsafe_view", "unsqueeze", "squeeze", "flatten")
