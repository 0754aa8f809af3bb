"""Rules for the ATen ops of graphs captured by ``torch.export`` (the export front end).

An exported graph calls ATen operators (``aten.conv2d.default``, ``aten.add_.Tensor``, ...)
where symbolic tracing records ``F.conv2d`` or ``operator.add``. Each ATen operator here is an
*alias* of the fx target that computes the same thing: it gets that target's rule and role, with
its arguments reordered where the ATen schema differs (``aten.embedding(weight, indices)``
against ``F.embedding(indices, weight)``). So one rule expresses one op for both front ends, and
a rule registered later for the fx target does not reach the alias (register the ATen operator
too). Every overload of a listed operator is aliased (``add.Tensor``, ``add.Scalar``, ...).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..context import RuleContext
from ..registry import (
    _ROLES,
    Decline,
    TracedTensor,
    find_rule,
    handles_indexes,
    handles_items,
    has_rule,
    register_role,
    register_rule,
)
from . import conv, elementwise, linear, norm, pool, reduce, shape  # noqa: F401  (aliased here)

aten = torch.ops.aten

# ATen operator name -> the torch function (or Tensor method name) with the same signature
_SAME: dict[str, Any] = {
    # elementwise arithmetic and comparisons
    **{n: torch.add for n in ("add", "add_")},
    **{n: torch.mul for n in ("mul", "mul_", "div", "div_", "sub", "sub_", "rsub", "pow",
                              "maximum", "minimum", "where", "masked_fill", "masked_fill_",
                              "lerp", "eq", "ne", "gt", "lt", "ge", "le", "logical_not",
                              "logical_and", "logical_or", "neg", "abs", "exp", "log", "log1p",
                              "sqrt", "rsqrt", "square", "reciprocal", "erf", "sin", "cos",
                              "clamp", "clamp_", "clamp_min", "clamp_max", "clone", "sign",
                              "floor", "ceil", "round", "nan_to_num", "fill_", "zero_",
                              "zeros_like", "ones_like", "full_like", "empty_like",
                              "alias", "lift_fresh_copy", "detach", "detach_")},
    # activations (hidden units: role "nonlinear")
    **{n: torch.relu for n in ("relu", "relu_")},
    **{n: torch.sigmoid for n in ("sigmoid", "sigmoid_")},
    **{n: torch.tanh for n in ("tanh", "tanh_")},
    **{n: F.gelu for n in ("gelu", "gelu_")},
    **{n: F.silu for n in ("silu", "silu_")},
    **{n: F.hardswish for n in ("hardswish", "hardswish_")},
    **{n: F.hardsigmoid for n in ("hardsigmoid", "hardsigmoid_")},
    **{n: F.hardtanh for n in ("hardtanh", "hardtanh_", "relu6")},
    **{n: F.leaky_relu for n in ("leaky_relu", "leaky_relu_")},
    **{n: F.elu for n in ("elu", "elu_")},
    "mish": F.mish, "softplus": F.softplus,
    **{n: F.dropout for n in ("dropout", "dropout_", "feature_dropout", "feature_dropout_",
                              "alpha_dropout", "alpha_dropout_", "native_dropout")},
    # dtype / layout casts keep values in place
    "_to_copy": "to", "to": "to", "contiguous": "contiguous", "type_as": "type_as",
    # shapes
    **{n: "view" for n in ("view", "_unsafe_view", "reshape", "flatten", "unflatten",
                           "squeeze", "squeeze_", "unsqueeze", "unsqueeze_")},
    "permute": "permute", "transpose": "transpose", "t": "t", "numpy_T": "t", "expand": "expand",
    "movedim": "movedim", "repeat": "repeat", "roll": "roll", "cat": torch.cat,
    "concat": torch.cat, "stack": torch.stack, "split": "split", "split_with_sizes": "split",
    "chunk": "chunk", "unbind": "unbind",
    # contractions, convolutions, pooling, reductions, softmax
    "linear": F.linear, "matmul": torch.matmul, "mm": torch.mm, "bmm": torch.bmm,
    "conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d,
    "scaled_dot_product_attention": F.scaled_dot_product_attention,
    "max_pool1d": F.max_pool1d, "max_pool2d": F.max_pool2d, "max_pool3d": F.max_pool3d,
    "avg_pool1d": F.avg_pool1d, "avg_pool2d": F.avg_pool2d, "avg_pool3d": F.avg_pool3d,
    "adaptive_avg_pool1d": F.adaptive_avg_pool1d, "adaptive_avg_pool2d": F.adaptive_avg_pool2d,
    "adaptive_avg_pool3d": F.adaptive_avg_pool3d, "mean": torch.mean, "sum": torch.sum,
    "amax": torch.amax, "amin": torch.amin, "softmax": torch.softmax, "topk": torch.topk,
    "max": torch.max, "min": torch.min, "median": torch.median, "argmax": torch.argmax,
    "argmin": torch.argmin,
    "_softmax": torch.softmax, "log_softmax": torch.log_softmax, "pad": F.pad,
    "addcmul": torch.addcmul, "addcdiv": torch.addcdiv, "view_as": "view_as",
    "reshape_as": "view_as", "expand_as": "expand_as",
    **{n: F.interpolate for n in ("upsample_nearest1d", "upsample_nearest2d",
                                  "upsample_nearest3d", "upsample_linear1d", "upsample_bilinear2d",
                                  "upsample_bicubic2d", "upsample_trilinear3d")},
    # tensors made from sizes: one value everywhere, or values by position
    **{n: torch.zeros for n in ("zeros", "ones", "full", "empty", "new_zeros", "new_ones",
                                "new_full", "new_empty")},
    **{n: torch.arange for n in ("arange", "linspace", "eye", "scalar_tensor", "randn", "rand",
                                 "randint")},
    # checks the exporter inserts: no values, no layout
    **{n: "size" for n in ("_assert_tensor_metadata", "_assert_scalar", "sym_size",
                           "sym_numel", "sym_stride")},
}  # fmt: skip


def _embedding(weight, indices, *args, **kwargs):
    return (indices, weight), {}


def _batch_norm(input, weight, bias, mean, var, training, momentum, eps, *rest):
    return (input, mean, var, weight, bias, training, momentum, eps), {}


def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, *rest):
    return (input, normalized_shape, weight, bias, eps), {}


def _group_norm(input, groups, weight=None, bias=None, eps=1e-5, *rest):
    return (input, groups, weight, bias, eps), {}


def _rms_norm(input, normalized_shape, weight=None, eps=None):
    return (input, normalized_shape, weight, eps), {}


def _einsum(equation, tensors, **kwargs):  # path= is a contraction order, not math
    return (equation, *tensors), {}


def _constant_pad(input, pad, value=0):
    return (input, pad, "constant", value), {}


def _vector_norm(x, ord=2, dim=None, keepdim=False, *, dtype=None):
    return (x,), {"dim": dim}


def _index(x, indices):  # x[i, j] with tensors i, j; None keeps an axis whole
    return (x, tuple(slice(None) if i is None else i for i in indices)), {}


def _select(x, dim, index):
    return (x, (slice(None),) * (dim % x.ndim) + (index,)), {}


def _slice(x, dim=0, start=None, end=None, step=1):
    return (x, (slice(None),) * (dim % x.ndim) + (slice(start, end, step),)), {}


# ATen operator name -> (fx target, argument adapter)
_REORDERED: dict[str, tuple[Any, Callable]] = {
    "embedding": (F.embedding, _embedding),
    "batch_norm": (F.batch_norm, _batch_norm),
    "layer_norm": (F.layer_norm, _layer_norm),
    "rms_norm": (F.rms_norm, _rms_norm),
    "einsum": (torch.einsum, _einsum),
    "constant_pad_nd": (F.pad, _constant_pad),
    "group_norm": (F.group_norm, _group_norm),
    "select": (operator.getitem, _select),
    "index": (operator.getitem, _index),
    "linalg_vector_norm": (torch.sum, _vector_norm),
    "slice": (operator.getitem, _slice),
}


def _fx_rule(target: Any) -> Callable:
    op = "call_method" if isinstance(target, str) else "call_function"
    rule = find_rule(op, target)
    if rule is None:
        raise LookupError(f"no fx rule for {target!r} to alias")
    return rule


def _adapted(rule: Callable, adapt: Callable) -> Callable:
    def aten_rule(ctx: RuleContext, *args, **kwargs):
        args, kwargs = adapt(*args, **kwargs)
        return rule(ctx, *args, **kwargs)

    aten_rule.__name__ = f"aten_{getattr(rule, '__name__', 'rule')}"
    if getattr(rule, "handles_items", False):  # aten.select is getitem: q, k, v = qkv[0..2]
        handles_items(aten_rule)
    if getattr(rule, "handles_indexes", False):
        handles_indexes(aten_rule)
    return aten_rule


def _overloads(name: str) -> list:
    packet = getattr(aten, name, None)
    return [] if packet is None else [getattr(packet, o) for o in packet.overloads()]


def _alias(name: str, target: Any, rule: Callable) -> None:
    ops = _overloads(name)
    if not ops:
        return
    register_rule(*ops)(rule)
    role = _ROLES.get(target)
    if isinstance(role, str):
        register_role(role, *ops)


def register_aten_rules() -> None:
    """Alias every listed ATen operator to its fx target's rule and role (idempotent)."""
    for name, target in _SAME.items():
        _alias(name, target, _fx_rule(target))
    for name, (target, adapt) in _REORDERED.items():
        _alias(name, target, _adapted(_fx_rule(target), adapt))
    _alias("addmm", torch.addmm, _addmm_rule)
    _alias("baddbmm", torch.baddbmm, _addmm_rule)  # BLOOM's ALiBi scores: bias + q @ k^T
    register_rule(*_overloads("_grouped_mm"))(grouped_mm)


def register_library_rules() -> None:
    """Rules for ops that other libraries register with torch when imported (so looked up at
    trace time, not at import): transformers' grouped expert matmul."""
    ns = getattr(torch.ops, "transformers", None)
    op = getattr(ns, "grouped_mm_fallback", None) if ns is not None else None
    if op is not None and not has_rule(op.default):
        register_rule(op.default)(grouped_mm)


def grouped_mm(ctx: RuleContext, input, weight, offs=None, bias=None, out_dtype=None):
    """Mixture-of-experts matmul: rows of ``input`` ``[S, k]`` sorted by expert, each block of
    rows times its expert's ``weight[e]`` (``[E, k, n]``). One permutation of ``k`` and one of
    ``n`` serve every expert; the expert axis stays fixed (the router picks experts by index)."""
    if input.ndim != 2 or weight.ndim != 3 or bias is not None:
        raise Decline("grouped matmul other than [S, k] x [E, k, n] without bias")
    ctx.unify(input.axes[1], weight.axes[1])
    ctx.freeze(weight.axes[0], "experts are picked by index (the router)")
    return [input.axes[0], weight.axes[2]]


def _addmm_rule(ctx: RuleContext, bias, x, w, *, beta=1, alpha=1):
    """``bias + x @ w`` (GPT-2's Conv1D; batched: ``baddbmm``): a matmul whose output axes
    take the bias's (``beta`` and ``alpha`` scale values, not positions)."""
    out = _fx_rule(torch.matmul)(ctx, x, w)
    return _fx_rule(torch.add)(ctx, _as_traced(ctx, out), bias) if bias is not None else out


def _as_traced(ctx: RuleContext, axes: list):
    return TracedTensor(tuple(a.size for a in axes), axes)


register_aten_rules()
