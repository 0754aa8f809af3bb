"""Hugging Face's mixture-of-experts modules: the experts as one permutable group.

transformers 5 keeps the experts of a MoE layer as stacked parameters (``gate_up_proj``
``[E, 2I, H]``, ``down_proj`` ``[E, H, I]``, or transposed) in a class made by its
``use_experts_implementation`` decorator. Every implementation it dispatches to (an eager loop,
batched or grouped matmuls) computes, for the router's top-k choices ``index`` and ``weights``::

    out[t] = sum_j weights[t, j] * expert_{index[t, j]}(x[t])
    expert_e(x) = down_e (act(gate_e x) * up_e x)        (without a gate: down_e act(up_e x))

So relabelling the experts (the first axis of every expert parameter) together with the values
of ``index`` leaves ``out`` unchanged, and so does one permutation of the hidden units applied to
every expert (the gate and activation are elementwise). ``index`` is the top-k indices over the
router's logits (an index tensor, see :class:`~permask.graph.registry.TracedTensor`): its axis is
the router's output, so router rows and experts move together. Where ``index`` is not traced
back to such an axis, the experts stay fixed. The export front end turns each such module back
into one call (:func:`permask.graph.export.export_capture`) so that this rule sees it whole;
anything outside the contract (a post-expert norm, a custom gate, expert parallelism, buffers)
is left to the ATen rules, where the experts stay fixed::

    graph = permask.trace(mixtral, {"input_ids": ids})
    print(graph)          # a group of size E: mlp.gate rows and mlp.experts.*[e]
"""

from __future__ import annotations

import os

import torch.nn as nn

from ..context import RuleContext
from ..registry import Decline, TracedTensor, handles_indexes, has_rule, register_rule

__all__ = ["is_experts", "experts", "register_experts_rule"]

_FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated", "has_post_expert_norm")
_DECORATOR_FILE = os.path.join("transformers", "integrations", "moe.py")


def is_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers experts module within the contract above."""
    cls = type(module)
    code = getattr(getattr(cls, "forward", None), "__code__", None)
    if code is None or not code.co_filename.endswith(_DECORATOR_FILE):
        return False  # not the decorator's dispatching forward
    if not all(isinstance(getattr(module, f, None), bool) for f in _FLAGS):
        return False
    if module.has_post_expert_norm or getattr(module, "_is_expert_parallel", True):
        return False
    if module.has_gate:
        gate = getattr(cls, "_apply_gate", None)
        code = getattr(gate, "__code__", None)
        if gate is None or gate.__name__ != "_default_apply_gate" or code is None:
            return False
        if not code.co_filename.endswith(_DECORATOR_FILE) or not module.is_concatenated:
            return False
    return next(module.buffers(), None) is None


@handles_indexes
def experts(ctx: RuleContext, hidden: TracedTensor, index: TracedTensor, weights: TracedTensor):
    """``out = sum_j weights[:, j] * expert_{index[:, j]}(hidden)`` (see the module docstring)."""
    m = ctx.module
    if m is None or not is_experts(m) or hidden.ndim != 2:
        raise Decline("an experts module outside transformers' contract")
    up = ctx.tensor("gate_up_proj" if m.has_gate else "up_proj")
    down = ctx.tensor("down_proj")
    if up is None or down is None or up.ndim != 3 or down.ndim != 3:
        raise Decline("experts without [E, n, k] up and down projections")
    (up_in, up_out), (down_in, down_out) = (_in_out(t, m.is_transposed) for t in (up, down))
    ctx.unify(up_in, hidden.axes[1])
    ctx.unify(down_out, hidden.axes[1])
    units = up_out
    if m.has_gate:  # [gate | up]: unit i of the gate and of the up half go together
        units, up_half = ctx.split(up_out, [up_out.size // 2, up_out.size // 2])
        ctx.unify(units, up_half)
    ctx.unify(down_in, units)
    ctx.unify(units, ctx.new(units.size))  # hidden units: free though no activation shows them
    expert_axes = [up.axes[0], down.axes[0]]
    if m.has_bias:
        for name, axis in (("gate_up_proj_bias" if m.has_gate else "up_proj_bias", up_out),
                           ("down_proj_bias", hidden.axes[1])):  # fmt: skip
            bias = ctx.tensor(name)
            if bias is None or bias.ndim != 2:
                raise Decline(f"experts without a [E, n] {name}")
            ctx.unify(bias.axes[1], axis)
            expert_axes.append(bias.axes[0])
    for axis in expert_axes[1:]:
        ctx.unify(expert_axes[0], axis)
    if index.indexes is None:
        ctx.freeze(expert_axes[0], "experts are picked by index (the router)")
    else:
        ctx.unify(expert_axes[0], index.indexes)
    return list(hidden.axes)


def _in_out(t: TracedTensor, transposed: bool) -> tuple:
    """(input axis, output axis) of a stacked projection ``[E, out, in]`` (or ``[E, in, out]``)."""
    return (t.axes[1], t.axes[2]) if transposed else (t.axes[2], t.axes[1])


def register_experts_rule(cls: type) -> None:
    """Give ``cls`` (a transformers experts class, found at trace time) the :func:`experts` rule."""
    if not has_rule(cls):
        register_rule(cls)(experts)
