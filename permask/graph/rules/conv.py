"""Convolutions (1d/2d/3d, transposed), with groups as block structure.

A conv with ``groups=G`` maps each block of input channels to its own block of output
channels, so channels are ``(blocks x within)``: a permutation may reorder whole blocks (one
shared permutation of G on input and output) and, independently, the channels inside the
blocks (one permutation on the input side, another on the output side). Depthwise convs
(within = 1) thus couple input and output channels one to one. Kernel axes are spatial and fixed.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from ..context import RuleContext
from ..registry import TracedTensor, register_rule


def _spatial_out(ctx: RuleContext, x: TracedTensor, nsp: int) -> list:
    """A kernel slides over positions: input positions freeze, output positions are fixed."""
    for ax in x.axes[x.ndim - nsp :]:
        ctx.freeze(ax, "a conv kernel slides over this axis")
    shape = ctx.out.shape
    return [ctx.fixed(s, "spatial positions") for s in shape[len(shape) - nsp :]]


def conv_axes(
    ctx,
    x: TracedTensor,
    w: TracedTensor,
    b: TracedTensor | None,
    groups: int,
    transposed: bool = False,
):
    nsp = w.ndim - 2
    c = x.ndim - nsp - 1  # channel axis (0 for unbatched input)
    w_in, w_out = (w.axes[0], w.axes[1]) if transposed else (w.axes[1], w.axes[0])
    for k in w.axes[2:]:
        ctx.freeze(k, "conv kernel spatial axis")
    if groups == 1:
        ctx.unify(x.axes[c], w_in)
        out_c = w_out
    elif transposed:  # weight (C_in, C_out/G, ...): C_in is (blocks x in/G)
        blocks = ctx.new(groups, f"{ctx.label}.blocks")
        ctx.unify(
            x.axes[c],
            ctx.product([blocks, ctx.new(x.shape[c] // groups, f"{ctx.label}.in_within")]),
        )
        ctx.unify(w_in, x.axes[c])
        out_c = ctx.product([blocks, w_out])
    else:  # weight (C_out, C_in/G, ...)
        blocks = ctx.new(groups, f"{ctx.label}.blocks")
        ctx.unify(x.axes[c], ctx.product([blocks, w_in]))
        ctx.unify(
            w_out, ctx.product([blocks, ctx.new(w.shape[0] // groups, f"{ctx.label}.out_within")])
        )
        out_c = w_out
    if b is not None:
        ctx.unify(b.axes[0], out_c)
    return [*x.axes[:c], out_c, *_spatial_out(ctx, x, nsp)]


@register_rule(F.conv1d, F.conv2d, F.conv3d)
def conv(ctx: RuleContext, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return conv_axes(ctx, input, weight, bias, groups)


@register_rule(F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)
def conv_transpose(ctx: RuleContext, input, weight, bias=None, stride=1, padding=0,
                   output_padding=0, groups=1, dilation=1):  # fmt: skip
    return conv_axes(ctx, input, weight, bias, groups, transposed=True)


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv_module(ctx: RuleContext, x: TracedTensor):
    m = ctx.module
    return conv_axes(ctx, x, ctx.tensor("weight"), ctx.tensor("bias"), m.groups)


@register_rule(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def conv_transpose_module(ctx: RuleContext, x: TracedTensor, output_size=None):
    m = ctx.module
    return conv_axes(ctx, x, ctx.tensor("weight"), ctx.tensor("bias"), m.groups, transposed=True)
