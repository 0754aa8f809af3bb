"""The op-rule registry: one place that says how each op moves tensor axes.

A rule is a small function ``rule(ctx: RuleContext, *args, **kwargs)`` called with the fx
node's arguments, in which every traced tensor is a :class:`TracedTensor` (its shape and one
axis term per dimension) and everything else is the concrete value seen while tracing. It
relates axes through ``ctx`` (:class:`~permask.graph.context.RuleContext`: unify, freeze, split,
...) and returns the axes of the output (a list with one term per dimension, or a tuple of such
lists for tuple outputs). Rules are keyed by

* module class (for fx leaf modules) -- e.g. ``nn.Conv2d``;
* function -- e.g. ``torch.cat``, ``F.layer_norm``, ``operator.add``;
* method name -- e.g. ``"view"``, ``"flatten"``.

A rule that raises :class:`Decline` (or any error) freezes every axis the op touches. An op with
no rule is frozen the same way: soundness never depends on a rule being present. Rules given to
one call, ``permask.trace(model, x, rules={target: rule})``, come before the registered ones.

Registering a rule for your own module class also makes it a tracing leaf::

    @permask.register_rule(MyGatedUnit)
    def _my_gated_unit(ctx: RuleContext, x: TracedTensor) -> list[AxisTerm]:
        w = ctx.tensor("weight")              # (C,) parameter of the module
        ctx.unify(w.axes[0], x.axes[-1])      # it scales the channels of x elementwise
        return x.axes                         # output has the layout of x
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from .unify import AxisTerm

__all__ = [
    "TracedTensor",
    "Decline",
    "register_rule",
    "find_rule",
    "handles_items",
    "handles_indexes",
    "Rule",
    "scoped_rules",
    "register_role",
    "find_role",
    "ROLES",
]

Rule = Callable[..., Any]

# Methods a subclass may define without changing what its forward computes.
_HARMLESS_METHODS = {
    "__init__",
    "__repr__",
    "extra_repr",
    "reset_parameters",
    "_get_name",
    "__setstate__",
    "_load_from_state_dict",
}


@dataclass
class TracedTensor:
    """A traced tensor: its shape and one layout per axis.

    A *stacked* tensor (``items`` set; e.g. timm's fused ``qkv`` after
    ``reshape(B, N, 3, H, D)``) holds ``k`` items along axis ``stack`` whose other axes need not
    share layouts: ``items[i]`` is the full layout list of item ``i`` (q, k and v get their own
    within-head group). Only rules marked with :func:`handles_items` may receive one; any other
    op freezes every item.

    An *index* tensor (``indexes`` set; the indices from ``torch.topk`` over a permuted axis)
    holds positions along the axis ``indexes`` as its values: permuting that axis changes them.
    Only rules marked with :func:`handles_indexes` may receive one (they follow the values, as
    Hugging Face's experts do with the router's choices); any other op freezes that axis.
    """

    shape: tuple[int, ...]
    axes: list[AxisTerm]
    dtype: torch.dtype | None = None
    items: list[list[AxisTerm]] | None = None
    stack: int | None = None
    indexes: AxisTerm | None = None

    @property
    def ndim(self) -> int:
        return len(self.shape)


def traced_tensors(*args: Any) -> list[TracedTensor]:
    """Every :class:`TracedTensor` in (nested) arguments, in ``tree_flatten`` order."""
    leaves, _ = tree_flatten(args, is_leaf=lambda x: isinstance(x, TracedTensor))
    return [x for x in leaves if isinstance(x, TracedTensor)]


def handles_items(rule: Rule) -> Rule:
    """Mark ``rule`` as one that understands stacked tensors (``TracedTensor.items``)."""
    rule.handles_items = True  # type: ignore[attr-defined]
    return rule


def handles_indexes(rule: Rule) -> Rule:
    """Mark ``rule`` as one that follows index tensors (``TracedTensor.indexes``)."""
    rule.handles_indexes = True  # type: ignore[attr-defined]
    return rule


class Decline(Exception):
    """Raised by a rule that cannot prove its case; the op's axes are frozen with this message."""


_MODULE_RULES: dict[type, Rule] = {}
_FUNCTION_RULES: dict[Any, Rule] = {}
_METHOD_RULES: dict[str, Rule] = {}
_Tables = tuple[dict[type, Rule], dict[Any, Rule], dict[str, Rule]]
_REGISTERED: _Tables = (_MODULE_RULES, _FUNCTION_RULES, _METHOD_RULES)
# Rules given to one trace(..., rules=...) call, looked up before the registered ones.
_SCOPED: ContextVar[_Tables | None] = ContextVar("permask_scoped_rules", default=None)


#: What an op is to activation matching (:mod:`permask.match.points`): "nonlinear" (its outputs
#: are hidden units), "residual" (an addition of streams), "pass_through" (repeats its input's
#: values: dropout, views, casts). A role may also be ``role(module) -> role or None``.
ROLES = ("nonlinear", "residual", "pass_through")
Role = str | Callable[[nn.Module], str | None]
_ROLES: dict[Any, Role] = {}


def _table(target: type | Callable | str, tables: _Tables) -> dict:
    modules, functions, methods = tables
    if isinstance(target, str):
        return methods
    if isinstance(target, type) and issubclass(target, nn.Module):
        return modules
    if callable(target):
        return functions
    raise TypeError(f"cannot register a rule for {target!r}: not a class, function or str")


def register_rule(
    *targets: type | Callable | str, override: bool = False, role: Role | None = None
) -> Callable[[Rule], Rule]:
    """Decorator registering ``rule`` for module classes, functions or method names.

    Registering an existing target raises unless ``override=True``. ``role`` also registers what
    the targets are to activation matching (:func:`register_role`). To use a rule for one call
    only, pass it to ``permask.trace(model, x, rules={target: rule})`` instead.
    """
    if not targets:
        raise TypeError("register_rule needs at least one module class, function or method name")

    def deco(rule: Rule) -> Rule:
        for t in targets:
            table = _table(t, _REGISTERED)
            if t in table and not override and table[t] is not rule:
                raise ValueError(f"a rule for {t!r} is already registered; pass override=True")
            table[t] = rule
        if role is not None:
            register_role(role, *targets)
        return rule

    return deco


@contextlib.contextmanager
def scoped_rules(rules: Mapping[Any, Rule]) -> Iterator[None]:
    """Within the block, ``rules`` (``{target: rule}``) come before the registered rules."""
    tables: _Tables = ({}, {}, {})
    for target, rule in rules.items():
        _table(target, tables)[target] = rule
    token = _SCOPED.set(tables if rules else None)
    try:
        yield
    finally:
        _SCOPED.reset(token)


def _lookup(kind: int, key: Any) -> Rule | None:
    scoped = _SCOPED.get()
    if scoped is not None and key in scoped[kind]:
        return scoped[kind][key]
    return _REGISTERED[kind].get(key)


def register_role(role: Role, *targets: type | Callable | str) -> None:
    """Say what ``targets`` (module classes, functions, method names) are to activation matching:
    one of :data:`ROLES`, or a function of the module giving one (or ``None``)."""
    if isinstance(role, str) and role not in ROLES:
        raise ValueError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    for t in targets:
        _table(t, _REGISTERED)  # the same kinds of target as rules
        _ROLES[t] = role


def find_role(op: str, target: Any, module: nn.Module | None = None) -> str | None:
    """The role of an fx node's op (see :data:`ROLES`), ``None`` if it has none."""
    if op == "call_module":
        cls = _rule_class(module)
        role = _ROLES.get(cls) if cls is not None else None
        return role(module) if callable(role) else role
    try:
        role = _ROLES.get(target)
    except TypeError:  # unhashable target
        return None
    return role if isinstance(role, str) else None


def has_rule(target: type | Callable | str) -> bool:
    """Whether ``target`` has a registered rule (rules given to one trace call not counted)."""
    try:
        return target in _table(target, _REGISTERED)
    except TypeError:
        return False


def has_module_rule(cls: type) -> bool:
    """Whether ``cls`` itself has a rule (such modules are traced as leaves)."""
    return _lookup(0, cls) is not None


def find_module_rule(module: nn.Module) -> Rule | None:
    """The rule of the module's class, or of a base class the module does not override.

    A subclass inherits its base's rule only if no class in between defines methods other than
    harmless ones: a new ``forward`` may compute anything, so it must not borrow a rule.
    """
    cls = _rule_class(module)
    return None if cls is None else _lookup(0, cls)


def _rule_class(module: nn.Module) -> type | None:
    """The class in the module's MRO whose rule applies to it (see :func:`find_module_rule`)."""
    for cls in type(module).__mro__:
        if _lookup(0, cls) is not None:
            return cls
        if any(callable(v) and k not in _HARMLESS_METHODS for k, v in vars(cls).items()):
            return None
    return None


def find_rule(op: str, target: Any, module: nn.Module | None = None) -> Rule | None:
    """Rule for an fx node's ``op`` and ``target`` (the module for ``call_module``)."""
    if op == "call_module":
        return find_module_rule(module)
    if op == "call_method":
        return _lookup(2, target)
    try:
        return _lookup(1, target)
    except TypeError:  # unhashable target
        return None
