"""Elementwise ops (any arity, with broadcasting), activations, dropout, identity, softmax.

An elementwise op commutes with any permutation applied to all operands alike, so the rule
unifies the equal-size axes of all tensor operands; broadcast (size-1) axes are ignored.
Softmax and normalisation along a dim are equivariant too, so they keep their input layout.
"""

from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..context import RuleContext
from ..registry import Decline, TracedTensor, register_role, register_rule, traced_tensors
from ._util import broadcast

_FUNCTIONS = [
    # arithmetic and comparisons
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv,
    operator.mod, operator.pow, operator.neg, operator.pos, operator.abs, operator.invert,
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.and_,
    operator.or_, operator.xor, operator.gt, operator.lt, operator.ge, operator.le,
    operator.eq, operator.ne,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide,
    torch.true_divide, torch.floor_divide, torch.remainder, torch.maximum, torch.minimum,
    torch.fmax, torch.fmin, torch.where, torch.lerp, torch.addcmul, torch.addcdiv, torch.pow,
    torch.eq, torch.ne, torch.gt, torch.lt, torch.ge, torch.le, torch.logical_and,
    torch.logical_or, torch.logical_not, torch.masked_fill, torch.atan2,
    # unary math
    torch.abs, torch.neg, torch.exp, torch.log, torch.log1p, torch.expm1, torch.sqrt,
    torch.rsqrt, torch.square, torch.sign, torch.floor, torch.ceil, torch.round, torch.trunc,
    torch.reciprocal, torch.erf, torch.sin, torch.cos, torch.clamp, torch.clip,
    torch.nan_to_num, torch.sigmoid, torch.tanh, torch.relu, torch.relu_, torch.clone,
    torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like,
    # activations and dropout
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.leaky_relu_, F.elu, F.elu_, F.selu, F.celu,
    F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.hardtanh_, F.sigmoid,
    F.tanh, F.softplus, F.softsign, F.logsigmoid, F.tanhshrink, F.threshold, F.hardshrink,
    F.softshrink, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
    F.feature_alpha_dropout,
]  # fmt: skip

_METHODS = [
    "add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "pow", "pow_",
    "maximum", "minimum", "masked_fill", "masked_fill_", "where", "lerp", "addcmul", "addcdiv",
    "eq", "ne", "gt", "lt", "ge", "le", "logical_not", "logical_and", "logical_or",
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "exp_", "log", "log1p",
    "sqrt", "rsqrt", "abs", "neg", "square", "sign", "floor", "ceil", "round", "reciprocal",
    "erf", "sin", "cos", "clamp", "clamp_", "clamp_min", "clamp_max", "clip", "nan_to_num",
    "float", "double", "half", "bfloat16", "bool", "int", "long", "contiguous", "clone",
    "detach", "zero_", "fill_", "requires_grad_", "cpu", "cuda",
]  # fmt: skip

_MODULES = [
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
    nn.Softplus, nn.Softsign, nn.LogSigmoid, nn.Tanhshrink, nn.Threshold, nn.Hardshrink,
    nn.Softshrink,
]  # fmt: skip


@register_rule(*_FUNCTIONS, *_METHODS, *_MODULES)
def elementwise(ctx: RuleContext, *args, **kwargs):
    return broadcast(ctx, traced_tensors(args, kwargs), ctx.out.shape)


# What activation matching looks at (permask.match.points): hidden units are the outputs of
# nonlinearities; residual streams show at additions; pass-through ops repeat their input.
register_role(
    "nonlinear",
    torch.sigmoid, torch.tanh, torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.leaky_relu,
    F.leaky_relu_, F.elu, F.elu_, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.hardtanh_, F.sigmoid, F.tanh, F.softplus,
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_",
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus,
)  # fmt: skip
register_role("residual", operator.add, operator.iadd, torch.add, "add", "add_")
register_role(
    "pass_through",
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout, nn.Identity, torch.clone, "clone", "contiguous", "float", "detach",
)  # fmt: skip


@register_rule("to", "type", "type_as", role="pass_through")
def cast(ctx: RuleContext, x: TracedTensor, *args, **kwargs):
    """Dtype/device casts; a tensor argument only supplies the dtype."""
    return x.axes


_SOFTMAX = [F.softmax, F.log_softmax, F.softmin, torch.softmax, torch.log_softmax, F.normalize]


@register_rule(*_SOFTMAX, "softmax", "log_softmax")
def along_dim(ctx: RuleContext, x: TracedTensor, *args, **kwargs):
    """Softmax / L_p-normalisation along a dim: equivariant under permutations of any axis."""
    if traced_tensors(args, kwargs):
        raise Decline("unexpected tensor argument")
    return x.axes


@register_rule(nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d)
def softmax_module(ctx: RuleContext, x: TracedTensor):
    return x.axes


@register_rule(nn.PReLU, F.prelu, role="nonlinear")
def prelu(ctx: RuleContext, x: TracedTensor, weight: TracedTensor | None = None):
    """PReLU: one slope per channel (axis 1), or one for all."""
    w = ctx.tensor("weight") if weight is None else weight
    if w.shape[0] > 1:
        ctx.unify(w.axes[0], x.axes[1 if x.ndim > 1 else 0])
    return x.axes
