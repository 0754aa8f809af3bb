"""Trace a model with torch.fx and build its :class:`PermutationGraph`.

1. ``torch.fx`` traces a deep copy of the model in eval mode, using timm's registries of leaf
   modules and autowrapped functions, plus every module class that has a registered rule.
2. One interpreted forward pass on the example inputs records every node's output shape (and
   the concrete value of non-tensor nodes such as ``x.shape``).
3. Each node's rule relates the axes of its inputs, outputs and parameters (see
   :mod:`permask.graph.registry`); unknown ops freeze what they touch.
4. The union-find result becomes groups, members, observation points and frozen axes.
"""

from __future__ import annotations

import copy
import inspect
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_map

from .._modules import unwrap
from . import rules as _rules  # noqa: F401  (registers the built-in rules)
from .graph import FrozenAxis, Group, Member, Observation, PermutationGraph
from .layout import layout_groups, locate
from .registry import Decline, TVal, find_rule, has_module_rule
from .unify import BLayout, LayoutMismatch, Reason, Solver

__all__ = ["trace", "TraceError"]


class TraceError(RuntimeError):
    """torch.fx could not trace the model (usually data-dependent control flow)."""


class TensorMeta:
    """Shape and dtype of a tensor seen while tracing (values are not kept)."""

    __slots__ = ("shape", "dtype")

    def __init__(self, t: torch.Tensor):
        self.shape = tuple(t.shape)
        self.dtype = t.dtype

    def __repr__(self) -> str:
        return f"TensorMeta({self.shape}, {self.dtype})"


def _timm_registries() -> tuple[set[type], list[Callable]]:
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # timm is optional at trace time
        return set(), []
    return set(get_notrace_modules()), list(get_notrace_functions())


class _Tracer(fx.Tracer):
    """fx tracer that knows timm's leaves and remembers which module failed to trace."""

    def __init__(self, leaves: set[type], autowrap: list[Callable]):
        super().__init__(autowrap_functions=tuple(autowrap))
        self.leaves = leaves
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        cls = type(m)
        return cls in self.leaves or has_module_rule(cls) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module sees the error first
                self.failed_in = self.path_of_module(m)
            raise


def _defaults_after(model: nn.Module, n_inputs: int) -> dict[str, Any]:
    """Defaults of ``forward``'s parameters after the first ``n_inputs`` (e.g. ``mask=None``).

    Traced as constants, so that ``if mask is not None`` takes the branch the call will take;
    a proxy for them would take the other one (timm's Hiera).
    """
    params = inspect.signature(model.forward).parameters.values()
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return {p.name: p.default for p in named[n_inputs:] if p.default is not p.empty}


def symbolic_trace(model: nn.Module, n_inputs: int | None = None) -> fx.GraphModule:
    """Trace ``model`` with timm's leaf modules; raise :class:`TraceError` naming the culprit.

    With ``n_inputs``, forward's later parameters are fixed at their defaults.
    """
    leaves, autowrap = _timm_registries()
    tracer = _Tracer(leaves, autowrap)
    concrete = None if n_inputs is None else _defaults_after(model, n_inputs) or None
    try:
        graph = tracer.trace(model, concrete_args=concrete)
    except Exception as e:
        where = tracer.failed_in or ""
        mod = model.get_submodule(where)
        where = where or "<root>"
        raise TraceError(
            f"torch.fx cannot trace module '{where}' ({type(mod).__name__}): "
            f"{type(e).__name__}: {e}. Fix: register that module class as a leaf with a rule "
            f"(`@permask.register_rule({type(mod).__name__})`, see docs/graph.md), or make its "
            "forward free of control flow that depends on tensor values."
        ) from e
    return fx.GraphModule(tracer.root, graph)


class _ShapeRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.extra_traceback = False  # our error names the node; fx's addition is noise
        self.metas: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as e:
            raise ValueError(
                f"running node '{n.name}' ({n.op} {_target_name(n)}) on the example inputs failed: "
                f"{type(e).__name__}: {e}. Check that example_inputs fit the model."
            ) from e
        self.metas[n] = tree_map(
            lambda v: TensorMeta(v) if isinstance(v, torch.Tensor) else v, result
        )
        return result


def _target_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    mod = getattr(t, "__module__", None) or ""
    name = getattr(t, "__name__", repr(t))
    return f"{mod}.{name}" if mod and mod != "_operator" else name


class RuleContext:
    """What a rule sees besides its arguments: the node, its module, and the solver."""

    def __init__(self, builder: _Builder, frame: _Frame, node: fx.Node, module: nn.Module | None):
        self._b = builder
        self.node = node
        self.module = module
        self.module_path = frame.prefix + node.target if node.op == "call_module" else None
        self.out = frame.metas.get(node)

    # -- axes -----------------------------------------------------------------------------
    def reason(self, message: str) -> Reason:
        return Reason(message, self.node.name, _target_name(self.node), self.module_path)

    def new(self, size: int, name: str | None = None) -> BLayout:
        """A fresh, free axis (a new group unless later unified with another).

        Use it for axes the rule proves free even if no activation outside a leaf module
        shows them (e.g. attention heads inside ``nn.MultiheadAttention``).
        """
        return self._b.solver.new(size, name or self.label, proven=True)

    @property
    def label(self) -> str:
        """A readable name for new axes: the module path, else the node name."""
        return self.module_path or self.node.name

    def fixed(self, size: int, why: str) -> BLayout:
        """A fresh axis that is never permuted (spatial positions, stacked items, ...)."""
        return self._b.solver.fixed(size, self.reason(why))

    def unify(self, a: BLayout, b: BLayout) -> None:
        """Axes ``a`` and ``b`` must be permuted identically."""
        self._b.solver.unify(a, b, self.reason("unify"))

    def freeze(self, layout: BLayout, why: str) -> None:
        self._b.solver.freeze(layout, self.reason(why))

    def split(self, layout: BLayout, sizes: Sequence[int]) -> list[BLayout]:
        """Cut an axis into consecutive segments; declines if that is impossible."""
        out = self._b.solver.split_cat(layout, list(sizes))
        if out is None:
            raise Decline(f"cannot cut an axis of size {layout.size} into segments {list(sizes)}")
        return out

    def factor(self, layout: BLayout, sizes: Sequence[int]) -> list[BLayout]:
        """Factor an axis into row-major factors; declines if that is impossible."""
        out = self._b.solver.split_prod(layout, list(sizes))
        if out is None:
            raise Decline(f"cannot factor an axis of size {layout.size} into {list(sizes)}")
        return out

    def concat(self, parts: Sequence[BLayout]) -> BLayout:
        from .unify import Cat

        return Cat(parts)

    def product(self, factors: Sequence[BLayout]) -> BLayout:
        from .unify import Prod

        return Prod(factors)

    # -- tensors of the module -------------------------------------------------------------
    def tensor(self, attr: str, module: nn.Module | None = None) -> TVal | None:
        """A parameter or buffer of the rule's module (or ``module``) as a member tensor."""
        owner = self.module if module is None else module
        t = getattr(owner, attr, None)
        if t is None:
            return None
        if not isinstance(t, torch.Tensor):
            raise Decline(f"attribute '{attr}' of {type(owner).__name__} is not a tensor")
        return self._b.member(t)

    def call(self, module: nn.Module, *args: Any) -> list[BLayout]:
        """Apply the rule of a submodule (e.g. the activation inside BatchNormAct2d)."""
        rule = find_rule("call_module", None, module)
        if rule is None:
            raise Decline(f"no rule for submodule {type(module).__name__}")
        sub = copy.copy(self)
        sub.module = module
        return rule(sub, *args)


MAX_INLINE_DEPTH = 4


class _Frame:
    """One graph being walked: the model's, or a leaf module's traced forward."""

    def __init__(self, gm: fx.GraphModule, metas: dict, prefix: str, depth: int = 0):
        self.gm = gm
        self.metas = metas
        self.prefix = prefix
        self.depth = depth
        self.env: dict[fx.Node, Any] = {}


class _Builder:
    def __init__(self, root: nn.Module, gm: fx.GraphModule, metas: dict[fx.Node, Any]):
        self.root = root
        self.gm = gm
        self.metas = metas
        self.solver = Solver()
        self.env: dict[fx.Node, Any] = {}
        self.inner_values: list[Any] = []  # activations inside inlined leaves (not observable)
        self.members: dict[str, TVal] = {}
        self.io_frozen: list[tuple[str, str, TVal]] = []
        self.names: dict[int, tuple[str, bool]] = {}
        for name, p in root.named_parameters():
            self.names.setdefault(id(p), (name, True))
        for name, b in root.named_buffers():
            self.names.setdefault(id(b), (name, False))

    # -- tensors ------------------------------------------------------------------------------
    def member(self, t: torch.Tensor) -> TVal:
        """Layouts of a parameter/buffer (created once; shared uses unify automatically)."""
        entry = self.names.get(id(t))
        if entry is None:
            return TVal(
                tuple(t.shape),
                [self.solver.fixed(s, Reason("constant tensor")) for s in t.shape],
                t.dtype,
            )
        name = entry[0]
        val = self.members.get(name)
        if val is None:
            val = TVal(
                tuple(t.shape),
                [self.solver.new(s, f"{name}:{i}") for i, s in enumerate(t.shape)],
                t.dtype,
            )
            self.members[name] = val
        return val

    def fixed_like(self, meta: Any, reason: Reason) -> Any:
        return tree_map(
            lambda m: (
                TVal(m.shape, [self.solver.fixed(s, reason) for s in m.shape], m.dtype)
                if isinstance(m, TensorMeta)
                else m
            ),
            meta,
        )

    def freeze_all(self, value: Any, reason: Reason) -> None:
        leaves, _ = tree_flatten(value, is_leaf=lambda x: isinstance(x, TVal))
        for v in leaves:
            if isinstance(v, TVal):
                for ax in [*v.axes, *(a for item in v.items or () for a in item)]:
                    self.solver.freeze(ax, reason)

    # -- the walk -----------------------------------------------------------------------------
    def run(self) -> None:
        frame = _Frame(self.gm, self.metas, "")
        for node in self.gm.graph.nodes:
            frame.env[node] = self.visit(frame, node)
        self.env = frame.env

    def visit(self, frame: _Frame, node: fx.Node) -> Any:
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
            reason = Reason("model output", node.name)
            self.freeze_all(args, reason)
            self.io_frozen.append(("output", node.name, args))
            return None
        module = frame.gm.get_submodule(node.target) if node.op == "call_module" else None
        tensor_in = _has_tval((args, kwargs))
        tensor_out = _has_meta(meta)
        if not tensor_in and not tensor_out and module is None:
            return meta
        ctx = RuleContext(self, frame, node, module)
        rule = find_rule(node.op, node.target, module)
        try:
            if _has_items((args, kwargs)) and not getattr(rule, "handles_items", False):
                raise Decline("stacked items reach an op that does not keep them apart")
            if rule is not None:
                return self.wrap(rule(ctx, *args, **kwargs), meta)
            if module is not None and not kwargs and frame.depth < MAX_INLINE_DEPTH:
                inner = self.inline(frame, node, module, args)
                if inner is not None:
                    return self.wrap(inner, meta)
            raise Decline("no rule for this op")
        except Exception as e:  # a rule that fails freezes what it touches, never corrupts
            return self.freeze_op(ctx, args, kwargs, meta, e)

    def inline(self, frame: _Frame, node: fx.Node, module: nn.Module, args: tuple) -> Any:
        """Walk the traced forward of a leaf module that has no rule, if it traces alone.

        timm marks some modules as leaves for its own feature extraction although they trace
        fine on their own (e.g. NormFreeBlock); walking their graph is exactly as sound as
        walking the model's. Returns None when the module does not trace alone.
        """
        if not all(isinstance(a, TVal) for a in args):
            return None
        try:
            gm = symbolic_trace(module)
        except TraceError:
            return None
        device = next(iter(module.parameters()), torch.empty(0, device="meta")).device
        inputs = [torch.zeros(a.shape, dtype=a.dtype, device=device) for a in args]
        recorder = _ShapeRecorder(gm)
        with torch.no_grad():
            recorder.run(*inputs)
        inner = _Frame(gm, recorder.metas, f"{frame.prefix}{node.target}.", frame.depth + 1)
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
        msg = str(err) if isinstance(err, Decline) else f"rule failed: {type(err).__name__}: {err}"
        reason = ctx.reason(msg)
        self.freeze_all((args, kwargs), reason)
        if ctx.module is not None:
            for t in [*ctx.module.parameters(), *ctx.module.buffers()]:
                self.freeze_all(self.member(t), reason)
        return self.fixed_like(meta, reason)

    def wrap(self, result: Any, meta: Any) -> Any:
        if isinstance(meta, TensorMeta):
            axes = result.axes if isinstance(result, TVal) else result
            if axes is None or len(axes) != len(meta.shape):
                raise LayoutMismatch(f"rule returned {axes!r} for a tensor of shape {meta.shape}")
            for ax, s in zip(axes, meta.shape):
                if ax.size != s:
                    raise LayoutMismatch(f"rule returned an axis of size {ax.size} for size {s}")
            if isinstance(result, TVal) and result.items is not None:
                return TVal(meta.shape, list(axes), meta.dtype, result.items, result.stack)
            return TVal(meta.shape, list(axes), meta.dtype)
        if isinstance(meta, (tuple, list)) and _has_meta(meta):
            if not isinstance(result, (tuple, list)) or len(result) != len(meta):
                raise LayoutMismatch(f"rule returned {type(result).__name__} for a tuple output")
            return tuple(self.wrap(r, m) for r, m in zip(result, meta))
        if _has_meta(meta):
            raise LayoutMismatch(f"unsupported output structure {type(meta).__name__}")
        return meta

    # -- results ------------------------------------------------------------------------------
    def finalize(self, shapes: dict[str, tuple[int, ...]]) -> PermutationGraph:
        s = self.solver
        observed: dict[int, None] = {}
        activations: list[tuple[fx.Node, int | None, int, BLayout]] = []
        for node, val in self.env.items():
            if node.op in ("output", "get_attr"):
                continue
            leaves, _ = tree_flatten(val, is_leaf=lambda x: isinstance(x, TVal))
            for item, v in enumerate(leaves):
                if isinstance(v, TVal):
                    for axis, ax in enumerate(v.axes):
                        activations.append((node, None if v is val else item, axis, ax))
                        observed.update(dict.fromkeys(leaf.id for leaf in s.leaves(ax)))
        inner, _ = tree_flatten(self.inner_values, is_leaf=lambda x: isinstance(x, TVal))
        for v in inner:
            if isinstance(v, TVal):
                for ax in v.axes:
                    observed.update(dict.fromkeys(leaf.id for leaf in s.leaves(ax)))
        in_members: dict[int, None] = {}
        for val in self.members.values():
            for ax in val.axes:
                in_members.update(dict.fromkeys(leaf.id for leaf in s.leaves(ax)))
        proven = {s.find(v).id for v in s.vars if v.proven}
        unobserved = [vid for vid in in_members if vid not in observed and vid not in proven]
        for (
            vid
        ) in unobserved:  # a parameter axis no rule or activation shows: nothing proves it free
            s.freeze(s.vars[vid], Reason("parameter axis never reaches an activation"))
        ids = {
            vid: f"#{vid}" for vid in in_members if not s.vars[vid].frozen and s.vars[vid].size > 1
        }
        names = self._group_names(ids)

        groups = {names[vid]: Group(names[vid], s.vars[vid].size) for vid in sorted(names)}
        tensors: dict[str, list] = {}
        frozen: list[FrozenAxis] = []
        for tname, val in self.members.items():
            layouts = [s.expand(ax, names) for ax in val.axes]
            tensors[tname] = layouts
            for axis, lay in enumerate(layouts):
                gs = layout_groups(lay)
                for g in gs:
                    groups[g].members.append(Member(tname, axis, lay))
                if not gs and lay.size > 1:
                    frozen.append(
                        FrozenAxis(tname, axis, lay.size, self._reasons(val.axes[axis]), "tensor")
                    )
        for node, item, axis, ax in activations:
            lay = s.expand(ax, names)
            for g in layout_groups(lay):
                groups[g].observations.append(
                    Observation(node.name, axis, lay, node.op, _target_name(node), item)
                )
        for kind, name, val in self.io_frozen:
            leaves, _ = tree_flatten(val, is_leaf=lambda x: isinstance(x, TVal))
            for v in leaves:
                if isinstance(v, TVal):
                    for axis, ax in enumerate(v.axes):
                        if ax.size > 1:
                            frozen.append(FrozenAxis(name, axis, ax.size, self._reasons(ax), kind))
        groups = {k: g for k, g in groups.items() if g.members}
        params = frozenset(n for n, _ in self.root.named_parameters())
        return PermutationGraph(groups, tensors, frozen, shapes, params, self.gm.graph)

    def _group_names(self, ids: dict[int, str]) -> dict[int, str]:
        """Name each group after the first tensor axis that carries it, e.g. ``fc.weight:0``,
        ``qkv.weight:0.1`` (factor 1 of that axis) or ``conv.weight:1[0:6]`` (a segment)."""
        first: dict[str, str] = {}
        for tname, val in self.members.items():
            for axis, ax in enumerate(val.axes):
                lay = self.solver.expand(ax, ids)
                for g in layout_groups(lay):
                    first.setdefault(g, f"{tname}:{axis}{locate(lay, g)}")
        names: dict[int, str] = {}
        used: set[str] = set()
        for vid in sorted(ids):
            base = name = first[ids[vid]]
            k = 1
            while name in used:
                k += 1
                name = f"{base}#{k}"
            used.add(name)
            names[vid] = name
        return names

    def _reasons(self, ax: BLayout) -> tuple[Reason, ...]:
        out: dict[Reason, None] = {}
        for leaf in self.solver.leaves(ax):
            out.update(dict.fromkeys(leaf.reasons))
        return tuple(out)


def _has_tval(x: Any) -> bool:
    leaves, _ = tree_flatten(x, is_leaf=lambda v: isinstance(v, TVal))
    return any(isinstance(v, TVal) for v in leaves)


def _has_items(x: Any) -> bool:
    leaves, _ = tree_flatten(x, is_leaf=lambda v: isinstance(v, TVal))
    return any(isinstance(v, TVal) and v.items is not None for v in leaves)


def _has_meta(x: Any) -> bool:
    leaves, _ = tree_flatten(x)
    return any(isinstance(v, TensorMeta) for v in leaves)


def trace(model: nn.Module, example_inputs: Any) -> PermutationGraph:
    """Trace ``model`` into a :class:`PermutationGraph`.

    ``example_inputs`` is a tensor or a tuple of tensors for ``model.forward``; shapes only
    matter (small inputs are fine). Tracing runs on a deep copy in eval mode on the model's
    device, so the model's parameters, buffers, modes and caches are left exactly as they were.
    DDP/DataParallel/``torch.compile`` wrappers are looked through (names are the inner module's).
    """
    model = unwrap(model)
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    work, gm, metas = _record(model, tuple(inputs))
    builder = _Builder(work, gm, metas)
    builder.run()
    shapes = {n: tuple(t.shape) for n, t in _named_tensors(work).items()}
    return builder.finalize(shapes)


def _record(model: nn.Module, inputs: tuple) -> tuple[nn.Module, fx.GraphModule, dict]:
    """Trace a copy and record node shapes, on meta tensors when every op supports them.

    The meta copy costs no parameter memory or compute; models with ops that need real data
    (``.item()``, tensors kept outside parameters and buffers) fall back to a real copy.
    """
    for meta in (True, False):
        work = (_meta_copy(model) if meta else copy.deepcopy(model)).eval()
        gm = symbolic_trace(work, len(inputs))
        recorder = _ShapeRecorder(gm)
        args = tree_map(_to_meta, inputs) if meta else inputs
        try:
            with torch.no_grad():
                recorder.run(*args)
        except ValueError:
            if meta:
                continue
            raise
        return work, gm, recorder.metas
    raise AssertionError("unreachable")


def _to_meta(x: Any) -> Any:
    return torch.empty_like(x, device="meta") if isinstance(x, torch.Tensor) else x


def _meta_copy(model: nn.Module) -> nn.Module:
    memo: dict[int, Any] = {}
    for t in [*model.parameters(), *model.buffers()]:
        m = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(m, t.requires_grad) if isinstance(t, nn.Parameter) else m
    return copy.deepcopy(model, memo)


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    out = dict(model.named_parameters())
    out.update(dict(model.named_buffers()))
    return out
