"""Pooling, resizing and padding: per-channel ops whose spatial outputs are fixed positions."""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from ..context import RuleContext
from ..registry import Decline, TracedTensor, register_rule


def spatial(ctx: RuleContext, x: TracedTensor, nsp: int) -> list:
    """Leading (batch, channel) axes pass; the last ``nsp`` axes become fixed positions."""
    if isinstance(ctx.out, tuple):
        raise Decline("pooling that returns indices")
    for ax in x.axes[x.ndim - nsp :]:
        ctx.freeze(ax, "pooling windows or resizing depend on positions")
    shape = ctx.out.shape
    return [*x.axes[: x.ndim - nsp], *(ctx.fixed(s, "spatial positions") for s in shape[-nsp:])]


def _rule(nsp: int):
    def rule(ctx, x: TracedTensor, *args, **kwargs):
        if kwargs.get("return_indices"):
            raise Decline("pooling that returns indices")
        return spatial(ctx, x, nsp)

    return rule


_BY_DIM = {
    1: [F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d, F.lp_pool1d,
        nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.LPPool1d],
    2: [F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.lp_pool2d,
        nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d],
    3: [F.max_pool3d, F.avg_pool3d, F.adaptive_avg_pool3d, F.adaptive_max_pool3d,
        nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d],
}  # fmt: skip
for _nsp, _targets in _BY_DIM.items():
    register_rule(*_targets)(_rule(_nsp))


@register_rule(F.interpolate, F.upsample, nn.Upsample, nn.UpsamplingNearest2d,
               nn.UpsamplingBilinear2d)  # fmt: skip
def interpolate(ctx: RuleContext, x: TracedTensor, *args, **kwargs):
    return spatial(ctx, x, x.ndim - 2)


def pad_axes(ctx: RuleContext, x: TracedTensor, pad, mode: str = "constant"):
    """Constant padding adds fixed segments around an axis; other modes copy by position."""
    axes = list(x.axes)
    for k in range(len(pad) // 2):
        d = x.ndim - 1 - k
        before, after = pad[2 * k], pad[2 * k + 1]
        if before == after == 0:
            continue
        if mode == "constant" and before >= 0 and after >= 0:
            axes[d] = ctx.concat(
                [ctx.fixed(before, "padding"), axes[d], ctx.fixed(after, "padding")]
            )
        else:
            ctx.freeze(axes[d], f"{mode} padding with {before}, {after}")
            axes[d] = ctx.fixed(x.shape[d] + before + after, "padded positions")
    return axes


@register_rule(F.pad)
def pad(ctx: RuleContext, input, pad, mode="constant", value=None):
    return pad_axes(ctx, input, pad, mode)


_PAD_MODULES = {
    nn.ZeroPad1d: "constant", nn.ZeroPad2d: "constant", nn.ZeroPad3d: "constant",
    nn.ConstantPad1d: "constant", nn.ConstantPad2d: "constant", nn.ConstantPad3d: "constant",
    nn.ReflectionPad1d: "reflect", nn.ReflectionPad2d: "reflect", nn.ReflectionPad3d: "reflect",
    nn.ReplicationPad1d: "replicate", nn.ReplicationPad2d: "replicate",
    nn.ReplicationPad3d: "replicate", nn.CircularPad1d: "circular",
    nn.CircularPad2d: "circular", nn.CircularPad3d: "circular",
}  # fmt: skip


@register_rule(*_PAD_MODULES)
def pad_module(ctx: RuleContext, x: TracedTensor):
    return pad_axes(ctx, x, ctx.module.padding, _PAD_MODULES[type(ctx.module)])
