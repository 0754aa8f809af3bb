"""Normalisation layers.

BatchNorm/InstanceNorm act per channel (axis 1): their parameters and running statistics follow
the channel axis. LayerNorm/RMSNorm normalise over the trailing dims with statistics that do
not depend on order, so those dims may be permuted with their affine parameters. GroupNorm(G)
pools statistics within G contiguous blocks: channels are ``(blocks x within)``.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from ..context import RuleContext
from ..registry import TracedTensor, register_rule


def per_channel(ctx: RuleContext, x: TracedTensor, *tensors: TracedTensor | None):
    c = 1 if x.ndim > 1 else 0
    for t in tensors:
        if t is not None:
            ctx.unify(t.axes[0], x.axes[c])
    return x.axes


@register_rule(F.batch_norm, F.instance_norm)
def batch_norm(ctx: RuleContext, input, running_mean=None, running_var=None, weight=None, bias=None,
               *args, **kwargs):  # fmt: skip
    return per_channel(ctx, input, running_mean, running_var, weight, bias)


_PER_CHANNEL = [
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d,
    nn.InstanceNorm2d, nn.InstanceNorm3d,
]  # fmt: skip


def bn_tensors(ctx: RuleContext, module=None) -> list:
    names = ("weight", "bias", "running_mean", "running_var")
    return [ctx.tensor(n, module) for n in names]


@register_rule(*_PER_CHANNEL)
def batch_norm_module(ctx: RuleContext, x: TracedTensor):
    return per_channel(ctx, x, *bn_tensors(ctx))


def trailing(ctx: RuleContext, x: TracedTensor, k: int, *tensors: TracedTensor | None):
    for t in tensors:
        if t is not None:
            for i, ax in enumerate(t.axes):
                ctx.unify(ax, x.axes[x.ndim - k + i])
    return x.axes


@register_rule(F.layer_norm, F.rms_norm)
def layer_norm(ctx: RuleContext, input, normalized_shape, weight=None, bias=None, *args, **kwargs):
    return trailing(ctx, input, len(normalized_shape), weight, bias)


@register_rule(nn.LayerNorm)
def layer_norm_module(ctx: RuleContext, x: TracedTensor):
    k = len(ctx.module.normalized_shape)
    return trailing(ctx, x, k, ctx.tensor("weight"), ctx.tensor("bias"))


@register_rule(nn.RMSNorm)
def rms_norm_module(ctx: RuleContext, x: TracedTensor):
    return trailing(ctx, x, len(ctx.module.normalized_shape), ctx.tensor("weight"))


def group_norm_axes(
    ctx, x: TracedTensor, groups: int, weight: TracedTensor | None, bias: TracedTensor | None
):
    c = x.shape[1]
    blocks = ctx.new(groups, f"{ctx.label}.blocks")
    within = ctx.new(c // groups, f"{ctx.label}.within")
    ctx.unify(x.axes[1], ctx.product([blocks, within]))
    return per_channel(ctx, x, weight, bias)


@register_rule(F.group_norm)
def group_norm(ctx: RuleContext, input, num_groups, weight=None, bias=None, eps=1e-5):
    return group_norm_axes(ctx, input, num_groups, weight, bias)


@register_rule(nn.GroupNorm)
def group_norm_module(ctx: RuleContext, x: TracedTensor):
    m = ctx.module
    return group_norm_axes(ctx, x, m.num_groups, ctx.tensor("weight"), ctx.tensor("bias"))
