"""Shape ops: reshape/flatten/view, permute/transpose, expand/repeat, indexing, cat/stack/split.

These do not compute, they move elements; each rule maps input layouts to output layouts
exactly (reshape as products of factors, slices and splits as segments of a concat), and
declines whatever it cannot map.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn as nn

from ..context import RuleContext
from ..registry import (
    Decline,
    TracedTensor,
    handles_indexes,
    handles_items,
    register_rule,
    traced_tensors,
)
from ._util import arg, norm_dim, size_one


def _reshape_groups(
    in_shape: tuple[int, ...], out_shape: tuple[int, ...]
) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """A row-major reshape as groups ``(input dims, output dims)`` of equal element count.

    Size-1 input dims belong to no group; a size-1 output dim is a group with no input dims.
    """
    groups = []
    i = j = 0
    while i < len(in_shape) or j < len(out_shape):
        if j < len(out_shape) and out_shape[j] == 1:
            groups.append(((), (j,)))
            j += 1
            continue
        if i < len(in_shape) and in_shape[i] == 1:
            i += 1
            continue
        pi, pj, i1, j1 = in_shape[i], out_shape[j], i + 1, j + 1
        while pi != pj:
            if pi < pj:
                pi *= in_shape[i1]
                i1 += 1
            else:
                pj *= out_shape[j1]
                j1 += 1
        groups.append((tuple(range(i, i1)), tuple(range(j, j1))))
        i, j = i1, j1
    return groups


def _group_axes(ctx: RuleContext, x: TracedTensor, src: tuple[int, ...], sizes: list[int]) -> list:
    """Layouts of one reshape group's output dims (``sizes``) from input dims ``src``."""
    if not src:
        return [size_one(ctx)]
    axes = [x.axes[k] for k in src if x.shape[k] != 1]
    combined = axes[0] if len(axes) == 1 else ctx.product(axes)
    return ctx.factor(combined, sizes) if len(sizes) > 1 else [combined]


def reshape_axes(ctx: RuleContext, x: TracedTensor, out_shape: tuple[int, ...]) -> list:
    """Layouts after a row-major reshape of ``x`` to ``out_shape``."""
    if 0 in x.shape or 0 in out_shape:
        raise Decline("reshape of an empty tensor")
    out: list = []
    for src, dst in _reshape_groups(x.shape, out_shape):
        out.extend(_group_axes(ctx, x, src, [out_shape[d] for d in dst]))
    return out


STACK_MAX = 4  # a reshape's leading factor of at most this size may be a stack of items


def _stacked_reshape(
    ctx: RuleContext, x: TracedTensor, out_shape: tuple[int, ...]
) -> TracedTensor | None:
    """timm's fused projections: ``(B, N, 3*H*D) -> (B, N, 3, H, D)``, taken apart by
    ``permute``/``unbind``/``[i]``. The reshape ties q, k and v's head-dim orders if read as one
    product ``3 x H x D``; read as three items ``H x D`` (segments of the Linear's output), each
    gets its own. Only when every use of the result takes the items apart; else ``None``.
    """
    if 0 in x.shape or 0 in out_shape:
        return None
    groups = _reshape_groups(x.shape, out_shape)
    candidates = [
        (src, dst)
        for src, dst in groups
        if sum(x.shape[k] != 1 for k in src) == 1
        and len(dst) >= 2
        and 2 <= out_shape[dst[0]] <= STACK_MAX
        and math.prod(out_shape[d] for d in dst[1:]) > 1
    ]
    if len(candidates) != 1 or not _only_taken_apart(ctx.node, candidates[0][1][0], len(out_shape)):
        return None
    src, dst = candidates[0]
    k, rest = out_shape[dst[0]], [out_shape[d] for d in dst[1:]]
    (axis,) = [x.axes[s] for s in src if x.shape[s] != 1]
    segments = ctx.split(axis, [axis.size // k] * k)
    stack_axis = ctx.fixed(k, "stacked items")
    shared = {d: _group_axes(ctx, x, s, [out_shape[i] for i in d]) for s, d in groups if d != dst}
    items = []
    for seg in segments:
        layouts: list = []
        for _, d in groups:
            if d == dst:
                layouts += [stack_axis, *(ctx.factor(seg, rest) if len(rest) > 1 else [seg])]
            else:
                layouts += shared[d]
        items.append(layouts)
    return TracedTensor(tuple(out_shape), list(items[0]), x.dtype, items, dst[0])


def _only_taken_apart(node, axis: int, ndim: int) -> bool:
    """Whether every use of ``node`` (through permutes and transposes) splits off its items
    along ``axis`` with ``unbind`` or an integer index."""
    if not node.users:
        return False
    for user in node.users:
        target, args = _op_name(user.target), user.args
        if target in ("permute", torch.permute):
            dims = _dims(args[1:]) if "dims" not in user.kwargs else list(user.kwargs["dims"])
            if len(dims) != ndim or not all(isinstance(d, int) for d in dims):
                return False
            if not _only_taken_apart(user, [d % ndim for d in dims].index(axis), ndim):
                return False
        elif target in ("transpose", "swapaxes", "swapdims", torch.transpose, torch.swapaxes):
            if not all(isinstance(d, int) for d in args[1:3]) or user.kwargs:
                return False
            a, b = args[1] % ndim, args[2] % ndim
            if not _only_taken_apart(user, {a: b, b: a}.get(axis, axis), ndim):
                return False
        elif target in ("unbind", torch.unbind):
            dim = args[1] if len(args) > 1 else user.kwargs.get("dim", 0)
            if not isinstance(dim, int) or dim % ndim != axis:
                return False
        elif target is operator.getitem:
            if _item_index(args[1], axis) is None:
                return False
        elif target == "select":  # torch.export's x[i] along one dim: aten.select(x, dim, i)
            if not all(isinstance(a, int) for a in args[1:3]) or args[1] % ndim != axis:
                return False
        else:
            return False
    return True


def _op_name(target):
    """An ATen operator's name (``aten.permute.default`` -> ``"permute"``: the export front
    end's graphs), else the fx target itself."""
    return target._opname if isinstance(target, torch._ops.OpOverload) else target


def _item_index(index, axis: int) -> int | None:
    """``i`` if ``index`` is ``[:, ..., :, i]`` with ``i`` at ``axis`` (full slices elsewhere)."""
    idx = list(index) if isinstance(index, tuple) else [index]
    if len(idx) <= axis or not isinstance(idx[axis], int) or isinstance(idx[axis], bool):
        return None
    full = slice(None)
    if any(not isinstance(i, slice) or i != full for i in idx[:axis] + idx[axis + 1 :]):
        return None
    return idx[axis]


_RESHAPES = [
    "view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as",
    "reshape_as", "ravel", torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze,
    torch.unflatten, torch.ravel, nn.Flatten, nn.Unflatten,
]  # fmt: skip


@register_rule(*_RESHAPES, role="pass_through")
def reshape(ctx: RuleContext, x: TracedTensor, *args, **kwargs):
    if any(isinstance(a, torch.dtype) for a in (*args, *kwargs.values())):
        raise Decline("view as another dtype reinterprets memory")
    return _stacked_reshape(ctx, x, ctx.out.shape) or reshape_axes(ctx, x, ctx.out.shape)


def _dims(args: tuple) -> list[int]:
    return list(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else list(args)


def _reorder(x: TracedTensor, order: list[int]) -> list | TracedTensor:
    """``x``'s axes in ``order`` (a stacked tensor keeps its items, reordered alike)."""
    axes = [x.axes[d] for d in order]
    if x.items is None:
        return axes
    items = [[item[d] for d in order] for item in x.items]
    return TracedTensor(x.shape, axes, x.dtype, items, order.index(x.stack))


@register_rule("permute", torch.permute, role="pass_through")
@handles_items
def permute(ctx: RuleContext, x: TracedTensor, *args, dims=None):
    order = _dims(args) if dims is None else list(dims)
    return _reorder(x, [norm_dim(d, x.ndim) for d in order])


@register_rule(
    "transpose", "swapaxes", "swapdims", torch.transpose, torch.swapaxes, role="pass_through"
)
@handles_items
def transpose(ctx: RuleContext, x: TracedTensor, dim0: int, dim1: int):
    order = list(range(x.ndim))
    a, b = norm_dim(dim0, x.ndim), norm_dim(dim1, x.ndim)
    order[a], order[b] = order[b], order[a]
    return _reorder(x, order)


@register_rule("t", torch.t)
def t(ctx: RuleContext, x: TracedTensor):
    return list(reversed(x.axes))


@register_rule("movedim", "moveaxis", torch.movedim, torch.moveaxis)
def movedim(ctx: RuleContext, x: TracedTensor, source, destination):
    src = [source] if isinstance(source, int) else list(source)
    dst = [destination] if isinstance(destination, int) else list(destination)
    src = [norm_dim(d, x.ndim) for d in src]
    dst = [norm_dim(d, x.ndim) for d in dst]
    rest = iter(a for i, a in enumerate(x.axes) if i not in src)
    placed = dict(zip(dst, (x.axes[s] for s in src)))
    return [placed[i] if i in placed else next(rest) for i in range(x.ndim)]


@register_rule(getattr)
@handles_indexes
def tensor_attribute(ctx: RuleContext, x, name: str, *default):
    """``x.shape`` and friends carry no layout; ``x.T`` / ``x.mT`` transpose; ``.values`` and
    ``.indices`` of ``max``/``topk``/``sort`` results are their items (index tensors stay so)."""
    if name in ("shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"):
        return None
    if isinstance(x, tuple) and name in ("values", "indices") and len(x) == 2:
        return x[0 if name == "values" else 1]
    if not isinstance(x, TracedTensor):
        raise Decline(f"attribute {name} of a non-tensor")
    ctx.freeze_indexes([x])
    if name == "T":
        return list(reversed(x.axes))
    if name == "mT":
        return [*x.axes[:-2], x.axes[-1], x.axes[-2]]
    raise Decline(f"tensor attribute '{name}'")


@register_rule("size", "dim", "numel", "ndimension", "get_device", "nelement", len)
def shape_query(ctx: RuleContext, *args, **kwargs):
    return None


@register_rule("expand", "expand_as", role="pass_through")
def expand(ctx: RuleContext, x: TracedTensor, *args, **kwargs):
    """Broadcast copies: an axis expanded from size 1 is constant, so any permutation is free."""
    out_shape = ctx.out.shape
    lead = len(out_shape) - x.ndim
    out = [ctx.new(s, f"{ctx.label}.expand") for s in out_shape[:lead]]
    for ax, s_in, s_out in zip(x.axes, x.shape, out_shape[lead:]):
        out.append(ax if s_in == s_out else ctx.new(s_out, f"{ctx.label}.expand"))
    return out


@register_rule("repeat")
def repeat(ctx: RuleContext, x: TracedTensor, *args):
    """Tiling: each axis becomes (copies x axis), copies slowest."""
    reps = _dims(args)
    lead = len(reps) - x.ndim
    out = [ctx.fixed(r, "repeat copies") for r in reps[:lead]]
    for ax, r in zip(x.axes, reps[lead:]):
        out.append(ax if r == 1 else ctx.product([ctx.fixed(r, "repeat copies"), ax]))
    return out


@register_rule("repeat_interleave", torch.repeat_interleave)
def repeat_interleave(ctx: RuleContext, x: TracedTensor, repeats, dim=None, **kwargs):
    if not isinstance(repeats, int) or dim is None:
        raise Decline("repeat_interleave with tensor repeats or without dim")
    d = norm_dim(dim, x.ndim)
    axes = list(x.axes)
    axes[d] = ctx.product([axes[d], ctx.fixed(repeats, "repeat copies")])
    return axes


def _several_index_tensors(ctx: RuleContext, x: TracedTensor, idx: list) -> list:
    """``x[i, j]`` with integer index tensors (and full slices): the indexed axes are read by
    position (frozen), the indices' broadcast shape takes their place (where they stand if they
    are adjacent, else first, as torch does), the sliced axes pass (CLIP's
    ``hidden[arange(B), ids.argmax(-1)]`` keeps its hidden channels free)."""
    full = slice(None)
    if len(idx) > x.ndim or any(
        not isinstance(i, TracedTensor) and not (isinstance(i, slice) and i == full) for i in idx
    ):
        raise Decline("several index tensors beside ints, None, Ellipsis or partial slices")
    idx = idx + [full] * (x.ndim - len(idx))
    where = [d for d, i in enumerate(idx) if isinstance(i, TracedTensor)]
    if any(idx[d].dtype == torch.bool for d in where):
        raise Decline("boolean-mask indexing")
    for d in where:
        ctx.freeze(x.axes[d], "positions picked by tensor indices")
        for ax in idx[d].axes:
            ctx.freeze(ax, "index values")
    shape = torch.broadcast_shapes(*(idx[d].shape for d in where))
    picked = [ctx.fixed(s, "positions picked by tensor indices") for s in shape]
    rest = [(d, x.axes[d]) for d in range(x.ndim) if d not in where]
    if where == list(range(where[0], where[-1] + 1)):  # adjacent: in their place
        before = [ax for d, ax in rest if d < where[0]]
        return before + picked + [ax for d, ax in rest if d > where[-1]]
    return picked + [ax for _, ax in rest]


def index_axes(ctx: RuleContext, x: TracedTensor, index) -> list:
    """Layouts after indexing ``x`` with ints, slices, None, Ellipsis and one integer tensor.

    A tensor index picks positions along its axis by value, so that axis is frozen and the
    index tensor's own axes take its place (e.g. a relative-position table indexed by a
    buffer of positions keeps its free head axis).
    """
    idx = list(index) if isinstance(index, tuple) else [index]
    tensors = [i for i in idx if isinstance(i, TracedTensor)]
    if any(isinstance(i, (list, torch.Tensor)) for i in idx):
        raise Decline("advanced indexing with non-traced index tensors")
    if len(tensors) > 1:
        return _several_index_tensors(ctx, x, idx)
    if tensors and (tensors[0].dtype == torch.bool or None in idx):
        raise Decline("boolean-mask indexing or None beside a tensor index")
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    if Ellipsis in idx:
        k = idx.index(Ellipsis)
        idx[k : k + 1] = [slice(None)] * (x.ndim - n_real)
    idx += [slice(None)] * (x.ndim - sum(1 for i in idx if i is not None))
    out: list = []
    d = 0
    for i in idx:
        if i is None:
            out.append(size_one(ctx))
            continue
        ax, size = x.axes[d], x.shape[d]
        d += 1
        if isinstance(i, int):
            i = i % size
            ctx.split(ax, [i, 1, size - i - 1])
        elif isinstance(i, slice):
            start, stop, step = i.indices(size)
            if step == 1:
                stop = max(stop, start)
                out.append(ctx.split(ax, [start, stop - start, size - stop])[1])
            else:
                ctx.freeze(ax, "strided or reversed slice")
                out.append(ctx.fixed(len(range(start, stop, step)), "strided slice"))
        elif isinstance(i, TracedTensor):
            ctx.freeze(ax, "positions picked by a tensor index")
            out.extend(i.axes)
        else:
            raise Decline(f"index of type {type(i).__name__}")
    return out


@register_rule(operator.getitem, role="pass_through")
@handles_items
@handles_indexes
def getitem(ctx: RuleContext, obj, index):
    if isinstance(obj, (tuple, list)):
        return obj[index]  # an index tensor stays one
    if not isinstance(obj, TracedTensor):
        raise Decline("indexing a non-tensor")
    ctx.freeze_indexes(traced_tensors((obj, index)))
    if obj.items is not None:
        i = _item_index(index, obj.stack)
        if i is None:
            raise Decline("indexing stacked items other than one item at a time")
        item = obj.items[i % len(obj.items)]
        return item[: obj.stack] + item[obj.stack + 1 :]
    return index_axes(ctx, obj, index)


@register_rule("roll", torch.roll)
def roll(ctx: RuleContext, x: TracedTensor, shifts, dims=None):
    """Cyclic shifts depend on position: the rolled axes freeze, the others pass."""
    rolled = range(x.ndim) if dims is None else [dims] if isinstance(dims, int) else dims
    for d in rolled:
        ctx.freeze(x.axes[norm_dim(d, x.ndim)], "roll shifts positions")
    return x.axes


@register_rule(torch.cat, torch.concat, torch.concatenate)
def cat(ctx: RuleContext, tensors, dim: int = 0, **kwargs):
    dim = kwargs.get("axis", dim)
    parts = [t for t in tensors if not (t.ndim == 1 and t.shape[0] == 0)]
    ndim = parts[0].ndim
    d = norm_dim(dim, ndim)
    out = list(parts[0].axes)
    for t in parts[1:]:
        for k in range(ndim):
            if k != d:
                ctx.unify(out[k], t.axes[k])
    out[d] = ctx.concat([t.axes[d] for t in parts])
    return out


@register_rule(torch.stack)
def stack(ctx: RuleContext, tensors, dim: int = 0):
    out = list(tensors[0].axes)
    for t in tensors[1:]:
        for a, b in zip(out, t.axes):
            ctx.unify(a, b)
    d = norm_dim(dim, len(out) + 1)
    out.insert(d, ctx.fixed(len(tensors), "stacked items"))
    return out


@register_rule("split", "chunk", "tensor_split", "split_with_sizes", torch.split,
               torch.chunk, torch.tensor_split, role="pass_through")  # fmt: skip
def split(ctx: RuleContext, x: TracedTensor, *args, **kwargs):
    """Outputs are consecutive segments of ``x`` along ``dim``."""
    outs = ctx.out
    dim = arg(args, kwargs, 1, "dim", 0)
    d = norm_dim(dim, x.ndim)
    sizes = [m.shape[d] for m in outs]
    if sum(sizes) != x.shape[d]:
        raise Decline("split pieces do not cover the axis")
    segs = ctx.split(x.axes[d], sizes)
    return tuple([*x.axes[:d], s, *x.axes[d + 1 :]] for s in segs)


@register_rule("unbind", torch.unbind, role="pass_through")
@handles_items
def unbind(ctx: RuleContext, x: TracedTensor, dim: int = 0):
    d = norm_dim(dim, x.ndim)
    if x.items is not None:
        if d != x.stack:
            raise Decline("unbinding stacked items along another axis")
        return tuple(item[:d] + item[d + 1 :] for item in x.items)
    ctx.split(x.axes[d], [1] * x.shape[d])
    return tuple([*x.axes[:d], *x.axes[d + 1 :]] for _ in range(x.shape[d]))


__all__ = ["reshape_axes", "index_axes"]


@register_rule(torch.zeros, torch.ones, torch.full, torch.empty, "new_zeros", "new_ones",
               "new_full", "new_empty")  # fmt: skip
def constant_fill(ctx: RuleContext, *args, **kwargs):
    """A tensor of one value everywhere: any permutation of any of its axes leaves it as it is,
    so each axis is free (it takes whatever layout it meets)."""
    return [ctx.new(s, f"{ctx.label}.fill") for s in ctx.out.shape]


@register_rule(torch.arange, torch.linspace, torch.eye, torch.tensor, torch.scalar_tensor,
               torch.randn, torch.rand, torch.randint)  # fmt: skip
def constant_positions(ctx: RuleContext, *args, **kwargs):
    """A tensor whose values depend on position (ranges, identities, literals, noise): fixed."""
    return [
        ctx.fixed(s, "values made from positions (arange, eye, a literal)") for s in ctx.out.shape
    ]
