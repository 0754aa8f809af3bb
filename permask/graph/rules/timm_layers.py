"""Rules for timm's leaf modules (the ones timm marks as not traceable) and activations.

timm's activation classes are elementwise; they matter when they sit inside a leaf such as
``BatchNormAct2d``, whose rule applies the rule of its ``act`` submodule.
"""

from __future__ import annotations

import torch.nn as nn

from ..registry import TracedTensor, find_role, has_rule, register_rule
from .conv import conv_axes
from .elementwise import elementwise
from .norm import bn_tensors, per_channel
from .pool import spatial

try:
    import timm.layers as tl
    from timm.layers import activations, activations_me
except ImportError:  # timm is optional for tracing
    tl = None

#: timm names these rules are attached to but the installed timm lacks (a rename in timm makes
#: a rule silently miss its class; the coverage sweep and tests/test_graph_timm.py fail on it).
MISSING_TIMM_NAMES: list[str] = []


def _register(*targets, role=None):
    """register_rule for the targets without a rule yet (a user's earlier rule is kept)."""

    def deco(rule):
        fresh = [t for t in targets if not has_rule(t)]
        if fresh:
            register_rule(*fresh, role=role)(rule)
        return rule

    return deco


if tl is not None:

    def _named(module, *names: str) -> list:
        MISSING_TIMM_NAMES.extend(f"{module.__name__}.{n}" for n in names if not hasattr(module, n))
        return [getattr(module, n) for n in names if hasattr(module, n)]

    _ACTS = [
        *_named(activations, "GELU", "GELUTanh", "HardMish", "HardSigmoid", "HardSwish", "Mish",
                "QuickGELU", "Sigmoid", "Swish", "Tanh"),
        *_named(activations_me, "HardMishMe", "HardSigmoidMe", "HardSwishMe", "MishMe",
                "SwishMe"),
    ]  # fmt: skip
    _register(*_ACTS, role="nonlinear")(elementwise)

    def _leaves(*names: str) -> list[type]:
        """timm's non-traceable module classes with these names (several share a name)."""
        found = [c for c in dict.fromkeys(tl.get_notrace_modules()) if c.__name__ in names]
        have = {c.__name__ for c in found}
        MISSING_TIMM_NAMES.extend(f"notrace module {n}" for n in names if n not in have)
        return found

    def _norm_act(ctx, x: TracedTensor):
        """BatchNorm (per channel) followed by the module's dropout and activation."""
        out = per_channel(ctx, x, *bn_tensors(ctx))
        for sub in ("drop", "act"):
            m = getattr(ctx.module, sub, None)
            if m is not None:
                out = ctx.call(m, TracedTensor(x.shape, list(out)))
        return out

    def _norm_act_role(module: nn.Module) -> str | None:
        """Nonlinear when the module ends in a nonlinearity (``act`` may be an Identity)."""
        act = getattr(module, "act", None)
        nonlinear = isinstance(act, nn.Module) and find_role("call_module", None, act)
        return "nonlinear" if nonlinear == "nonlinear" else None

    _NORM_ACTS = _leaves("BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d")
    _register(*_NORM_ACTS, role=_norm_act_role)(_norm_act)

    def _conv_same(ctx, x: TracedTensor):
        """TF-'same' padded (and weight-standardised) convs: channels as in a plain conv.

        Weight standardisation normalises each output filter over its (in, kh, kw) entries,
        which no permutation of input channels changes; ``gain`` scales output filters.
        """
        w = ctx.tensor("weight")
        gain = ctx.tensor("gain")
        if gain is not None:
            ctx.unify(gain.axes[0], w.axes[0])
        return conv_axes(ctx, x, w, ctx.tensor("bias"), ctx.module.groups)

    _register(*_leaves("Conv2dSame", "StdConv2dSame", "ScaledStdConv2dSame"))(_conv_same)

    def _pool_same(ctx, x: TracedTensor):
        return spatial(ctx, x, 2)

    _register(*_leaves("MaxPool2dSame", "AvgPool2dSame"))(_pool_same)

    def _fourier_positions(ctx, *args, **kwargs):
        """Fourier position features projected by a 1x1 conv: the output channels are free."""
        proj = ctx.module.token_projection
        w, b = ctx.tensor("weight", proj), ctx.tensor("bias", proj)
        for ax in w.axes[1:]:
            ctx.freeze(ax, "fixed Fourier features")
        if b is not None:
            ctx.unify(b.axes[0], w.axes[0])
        shape = ctx.out.shape
        return [ctx.fixed(shape[0], "batch"), w.axes[0]] + [
            ctx.fixed(s, "spatial positions") for s in shape[2:]
        ]

    _register(*_leaves("PositionalEncodingFourier"))(_fourier_positions)

    def _window_reverse(channel_axis: int):
        def rule(ctx, windows: TracedTensor, *args, **kwargs):
            """Windows back to an image: positions move, the channel axis is kept."""
            for d, ax in enumerate(windows.axes):
                if d != channel_axis % windows.ndim:
                    ctx.freeze(ax, "window positions")
            shape = ctx.out.shape
            out = [ctx.fixed(s, "spatial positions") for s in shape]
            out[channel_axis] = windows.axes[channel_axis]
            return out

        return rule

    _CHANNEL_AXIS = {"window_reverse": -1, "grid_reverse": -1, "window_reverse_nchw": 1,
                     "grid_reverse_nchw": 1}  # fmt: skip
    _seen = set()
    for _fn in tl.get_notrace_functions():
        _name = getattr(_fn, "__name__", "")
        if _name in _CHANNEL_AXIS:
            _register(_fn)(_window_reverse(_CHANNEL_AXIS[_name]))
            _seen.add(_name)
    MISSING_TIMM_NAMES.extend(f"notrace function {n}" for n in _CHANNEL_AXIS if n not in _seen)
