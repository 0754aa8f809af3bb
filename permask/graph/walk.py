"""Walk a captured graph node by node, applying each node's rule to the axes of its inputs.

:class:`Walker` holds the union-find :class:`~permask.graph.unify.AxisUnion` of one trace. Every
tensor becomes a :class:`TracedTensor` (one axis term per dimension): model inputs and outputs are
fixed, parameters and buffers get fresh axes once (shared tensors share them), and each op's rule
relates the axes through a :class:`RuleContext`. An op without a rule, a rule that declines or
fails, and a rule that returns axes of the wrong size all freeze what the op touches: nothing a
rule gets wrong can make a permutation change the function. A leaf module without a rule is
walked through its own traced forward when it traces alone (timm's NormFreeBlock).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_map

from .capture import fx_capture
from .context import RuleContext
from .errors import TraceError
from .graph import NO_RULE, RULE_FAILED
from .registry import Decline, TracedTensor, find_rule, traced_tensors
from .shapes import ShapeRecorder, TensorMeta
from .unify import AxisUnion, LayoutMismatch, Reason

__all__ = ["Walker", "Frame", "MAX_INLINE_DEPTH"]

MAX_INLINE_DEPTH = 4
_UNSAVED = "buffer not in the state dict (computed, e.g. RoPE frequencies)"


class Frame:
    """One graph being walked: the model's, or a leaf module's traced forward."""

    def __init__(self, gm: fx.GraphModule, metas: dict, prefix: str, depth: int = 0):
        self.gm = gm
        self.metas = metas
        self.prefix = prefix
        self.depth = depth
        self.env: dict[fx.Node, Any] = {}


class Walker:
    """The axes of every value of one model's graph; :meth:`run` walks it once.

    Buffers named in ``unsaved`` (non-persistent: not in the state dict) are constants with fixed
    axes: a permutation applied to them in memory would be lost by a save and load.

    After :meth:`run`: ``env`` (node -> :class:`TracedTensor` or concrete value), ``members``
    (parameter/buffer name -> :class:`TracedTensor`), ``io_frozen`` (model inputs and outputs),
    ``inner_values`` (values inside walked leaf modules) and ``solver``.
    """

    def __init__(
        self,
        root: nn.Module,
        gm: fx.GraphModule,
        metas: dict[fx.Node, Any],
        unsaved: frozenset[str] = frozenset(),
    ):
        self.root = root
        self.unsaved = unsaved  # buffers outside the state dict: their axes stay fixed
        self.gm = gm
        self.metas = metas
        self.solver = AxisUnion()
        self.env: dict[fx.Node, Any] = {}
        self.inner_values: list[Any] = []  # activations inside inlined leaves (not observable)
        self.members: dict[str, TracedTensor] = {}
        self.io_frozen: list[tuple[str, str, TracedTensor]] = []
        self.names: dict[int, tuple[str, bool]] = {}
        for name, p in root.named_parameters():
            self.names.setdefault(id(p), (name, True))
        for name, b in root.named_buffers():
            self.names.setdefault(id(b), (name, False))

    # -- tensors ------------------------------------------------------------------------------
    def member(self, t: torch.Tensor) -> TracedTensor:
        """Axes of a parameter/buffer (created once; shared uses unify automatically)."""
        entry = self.names.get(id(t))
        # permuted in memory, a buffer outside the state dict would not survive save and load
        if entry is None or entry[0] in self.unsaved:
            why = "constant tensor" if entry is None else _UNSAVED
            reason = Reason(why)
            return TracedTensor(
                tuple(t.shape), [self.solver.fixed(s, reason) for s in t.shape], t.dtype
            )
        name = entry[0]
        val = self.members.get(name)
        if val is None:
            axes = [self.solver.new(s, f"{name}:{i}") for i, s in enumerate(t.shape)]
            val = self.members[name] = TracedTensor(tuple(t.shape), axes, t.dtype)
        return val

    def fixed_like(self, meta: Any, reason: Reason) -> Any:
        def fixed(m: Any) -> Any:
            if not isinstance(m, TensorMeta):
                return m
            return TracedTensor(m.shape, [self.solver.fixed(s, reason) for s in m.shape], m.dtype)

        return tree_map(fixed, meta)

    def freeze_all(self, value: Any, reason: Reason) -> None:
        for v in traced_tensors(value):
            for ax in [*v.axes, *(a for item in v.items or () for a in item)]:
                self.solver.freeze(ax, reason)
            if v.indexes is not None:
                self.solver.freeze(v.indexes, reason)

    # -- the walk -----------------------------------------------------------------------------
    def run(self) -> None:
        frame = Frame(self.gm, self.metas, "")
        for node in self.gm.graph.nodes:
            frame.env[node] = self.visit(frame, node)
        self.env = frame.env

    def visit(self, frame: Frame, node: fx.Node) -> Any:
        meta = frame.metas.get(node)
        if node.op == "placeholder":
            val = self.fixed_like(meta, Reason("model input", node.name))
            self.io_frozen.append(("input", node.name, val))
            return val
        if node.op == "get_attr":
            obj = operator.attrgetter(node.target)(frame.gm)
            return self.member(obj) if isinstance(obj, torch.Tensor) else meta
        args = fx.node.map_arg(node.args, frame.env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, frame.env.__getitem__)
        if node.op == "output":
            self.freeze_all(args, Reason("model output", node.name))
            self.io_frozen.append(("output", node.name, args))
            return None
        module = frame.gm.get_submodule(node.target) if node.op == "call_module" else None
        if not traced_tensors((args, kwargs)) and not _has_meta(meta) and module is None:
            return meta
        ctx = RuleContext(self, frame, node, module)
        try:
            return self.apply(ctx, frame, args, kwargs, meta)
        except Exception as e:  # a rule that fails freezes what it touches, never corrupts
            return self.freeze_op(ctx, args, kwargs, meta, e)

    def apply(self, ctx: RuleContext, frame: Frame, args: tuple, kwargs: dict, meta: Any) -> Any:
        """The output axes of ``ctx.node`` by its rule (or by walking its module's forward)."""
        node, module = ctx.node, ctx.module
        rule = find_rule(node.op, node.target, module)
        stacked = any(v.items is not None for v in traced_tensors((args, kwargs)))
        if stacked and not getattr(rule, "handles_items", False):
            raise Decline("stacked items reach an op that does not keep them apart")
        if not getattr(rule, "handles_indexes", False):
            ctx.freeze_indexes(traced_tensors((args, kwargs)))
        if rule is not None:
            return self.wrap(rule(ctx, *args, **kwargs), meta)
        if module is not None and not kwargs and frame.depth < MAX_INLINE_DEPTH:
            inner = self.inline(frame, node, module, args)
            if inner is not None:
                return self.wrap(inner, meta)
        raise Decline(NO_RULE)

    def inline(self, frame: Frame, node: fx.Node, module: nn.Module, args: tuple) -> Any:
        """Walk the traced forward of a leaf module that has no rule, if it traces alone.

        timm marks some modules as leaves for its own feature extraction although they trace
        fine on their own (e.g. NormFreeBlock); walking their graph is exactly as sound as
        walking the model's. Returns None when the module does not trace alone.
        """
        if not all(isinstance(a, TracedTensor) for a in args):
            return None
        try:
            gm = fx_capture(module)
        except TraceError:
            return None
        device = next(iter(module.parameters()), torch.empty(0, device="meta")).device
        inputs = [torch.zeros(a.shape, dtype=a.dtype, device=device) for a in args]
        recorder = ShapeRecorder(gm)
        with torch.no_grad():
            recorder.run(*inputs)
        inner = Frame(gm, recorder.metas, f"{frame.prefix}{node.target}.", frame.depth + 1)
        placeholders = iter(args)
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                inner.env[n] = next(placeholders)
            elif n.op == "output":
                out = fx.node.map_arg(n.args[0], inner.env.__getitem__)
                self.inner_values.extend(inner.env.values())
                return out
            else:
                inner.env[n] = self.visit(inner, n)
        return None

    def freeze_op(self, ctx: RuleContext, args, kwargs, meta, err: Exception) -> Any:
        failed = f"{RULE_FAILED}: {type(err).__name__}: {err}"
        msg = str(err) if isinstance(err, Decline) else failed
        reason = ctx.reason(msg)
        self.freeze_all((args, kwargs), reason)
        if ctx.module is not None:
            for t in [*ctx.module.parameters(), *ctx.module.buffers()]:
                self.freeze_all(self.member(t), reason)
        return self.fixed_like(meta, reason)

    def wrap(self, result: Any, meta: Any) -> Any:
        """Check a rule's result against the recorded output; the output's TracedTensor."""
        if isinstance(meta, TensorMeta):
            axes = result.axes if isinstance(result, TracedTensor) else result
            if axes is None or len(axes) != len(meta.shape):
                raise LayoutMismatch(f"rule returned {axes!r} for a tensor of shape {meta.shape}")
            for ax, s in zip(axes, meta.shape):
                if ax.size != s:
                    raise LayoutMismatch(f"rule returned an axis of size {ax.size} for size {s}")
            if isinstance(result, TracedTensor):
                return TracedTensor(
                    meta.shape, list(axes), meta.dtype, result.items, result.stack, result.indexes
                )
            return TracedTensor(meta.shape, list(axes), meta.dtype)
        if isinstance(meta, (tuple, list)) and _has_meta(meta):
            if not isinstance(result, (tuple, list)) or len(result) != len(meta):
                raise LayoutMismatch(f"rule returned {type(result).__name__} for a tuple output")
            return tuple(self.wrap(r, m) for r, m in zip(result, meta))
        if _has_meta(meta):
            raise LayoutMismatch(f"unsupported output structure {type(meta).__name__}")
        return meta


def _has_meta(x: Any) -> bool:
    leaves, _ = tree_flatten(x)
    return any(isinstance(v, TensorMeta) for v in leaves)
