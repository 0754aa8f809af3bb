"""Rules for timm's leaf modules (the ones timm marks as not traceable) and activations.

timm's activation classes are elementwise; they matter when they sit inside a leaf such as
``BatchNormAct2d``, whose rule applies the rule of its ``act`` submodule.
"""

from __future__ import annotations

from ..registry import TVal, register_rule
from .conv import conv_axes
from .elementwise import elementwise
from .norm import bn_tensors, per_channel
from .pool import spatial

try:
    import timm.layers as tl
    from timm.layers import activations, activations_me
except ImportError:  # timm is optional for tracing
    tl = None

if tl is not None:
    _ACTS = [
        getattr(mod, name)
        for mod, names in (
            (activations, ["GELU", "GELUTanh", "HardMish", "HardSigmoid", "HardSwish", "Mish",
                           "QuickGELU", "Sigmoid", "Swish", "Tanh"]),
            (activations_me, ["HardMishMe", "HardSigmoidMe", "HardSwishMe", "MishMe", "SwishMe"]),
        )
        for name in names
        if hasattr(mod, name)
    ]  # fmt: skip
    register_rule(*_ACTS)(elementwise)

    def _norm_act(ctx, x: TVal):
        """BatchNorm (per channel) followed by the module's dropout and activation."""
        out = per_channel(ctx, x, *bn_tensors(ctx))
        for sub in ("drop", "act"):
            m = getattr(ctx.module, sub, None)
            if m is not None:
                out = ctx.call(m, TVal(x.shape, list(out)))
        return out

    register_rule(
        *(getattr(tl, n) for n in ("BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d")
          if hasattr(tl, n))
    )(_norm_act)  # fmt: skip

    def _conv_same(ctx, x: TVal):
        """TF-'same' padded (and weight-standardised) convs: channels as in a plain conv.

        Weight standardisation normalises each output filter over its (in, kh, kw) entries,
        which no permutation of input channels changes; ``gain`` scales output filters.
        """
        w = ctx.tensor("weight")
        gain = ctx.tensor("gain")
        if gain is not None:
            ctx.unify(gain.axes[0], w.axes[0])
        return conv_axes(ctx, x, w, ctx.tensor("bias"), ctx.module.groups)

    register_rule(
        *(getattr(tl, n) for n in ("Conv2dSame", "StdConv2dSame", "ScaledStdConv2dSame")
          if hasattr(tl, n))
    )(_conv_same)  # fmt: skip

    def _pool_same(ctx, x: TVal):
        return spatial(ctx, x, 2)

    register_rule(*(getattr(tl, n) for n in ("MaxPool2dSame", "AvgPool2dSame") if hasattr(tl, n)))(
        _pool_same
    )
