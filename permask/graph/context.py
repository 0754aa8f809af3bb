"""What a rule sees besides its arguments: :class:`RuleContext`.

A rule is ``rule(ctx: RuleContext, *args, **kwargs) -> list of axes`` (see
:mod:`permask.graph.registry`). Through ``ctx`` it reads the node and module it is applied to,
and relates axes: ``unify`` (permuted identically), ``freeze`` (never permuted), ``fixed`` and
``new`` (fresh axes), ``split``/``factor`` (cut an axis into segments or row-major factors),
``concat``/``product`` (build such an axis), ``tensor`` (a parameter of the module) and
``call`` (a submodule's rule). A rule that cannot prove its case raises :class:`Decline`::

    @permask.register_rule(MyScale)
    def my_scale(ctx: RuleContext, x: TracedTensor) -> list:
        w = ctx.tensor("weight")              # (C,) parameter of the module
        ctx.unify(w.axes[0], x.axes[-1])      # it scales the channels of x elementwise
        return x.axes                         # the output has the layout of x
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
import torch.nn as nn

from .capture import target_name
from .registry import Decline, TracedTensor, find_rule
from .unify import AxisTerm, ConcatTerm, ProductTerm, Reason

if TYPE_CHECKING:
    from .walk import Frame, Walker

__all__ = ["RuleContext"]


class RuleContext:
    """The node a rule is applied to, its module, and the operations on axes.

    Attributes: ``node`` (the ``torch.fx.Node``), ``module`` (the ``nn.Module`` of a
    ``call_module`` node, else ``None``), ``module_path`` (its dotted path in the model),
    ``within`` (the path of the module whose forward makes the call, "" at the top) and ``out``
    (the recorded output: a ``TensorMeta`` with ``shape`` and ``dtype``, or a tuple).
    """

    def __init__(self, walker: Walker, frame: Frame, node: fx.Node, module: nn.Module | None):
        self._walker = walker
        self.node = node
        self.module = module
        self.module_path = frame.prefix + node.target if node.op == "call_module" else None
        stack = node.meta.get("nn_module_stack") or {}
        caller = next(reversed(stack.values()))[0] if stack else ""
        self.within = (frame.prefix + caller) if caller else frame.prefix.rstrip(".")
        self.out: Any = frame.metas.get(node)

    # -- axes -----------------------------------------------------------------------------
    def reason(self, message: str) -> Reason:
        """A :class:`Reason` naming this node, its op and the module it is or sits in."""
        where = self.module_path or self.within or None
        return Reason(message, self.node.name, target_name(self.node), where)

    def new(self, size: int, name: str | None = None) -> AxisTerm:
        """A fresh, free axis (a new group unless later unified with another).

        Use it for axes the rule proves free even if no activation outside a leaf module
        shows them (e.g. attention heads inside ``nn.MultiheadAttention``).
        """
        return self._walker.solver.new(size, name or self.label, proven=True)

    @property
    def label(self) -> str:
        """A readable name for new axes: the module path, else the node name."""
        return self.module_path or self.node.name

    def fixed(self, size: int, why: str) -> AxisTerm:
        """A fresh axis that is never permuted (spatial positions, stacked items, ...)."""
        return self._walker.solver.fixed(size, self.reason(why))

    def unify(self, a: AxisTerm, b: AxisTerm) -> None:
        """Axes ``a`` and ``b`` must be permuted identically."""
        self._walker.solver.unify(a, b, self.reason("unify"))

    def freeze(self, layout: AxisTerm, why: str) -> None:
        """``layout`` is never permuted (and ``why`` is shown in the graph's printout)."""
        self._walker.solver.freeze(layout, self.reason(why))

    def freeze_indexes(self, values: Sequence[TracedTensor]) -> None:
        """Freeze the axes whose positions index tensors among ``values`` hold as values
        (:class:`TracedTensor`): for an op that reads them as numbers, not as indices."""
        for v in values:
            if v.indexes is not None:
                self.freeze(v.indexes, "its positions reach an op as values (top-k indices)")

    def split(self, layout: AxisTerm, sizes: Sequence[int]) -> list[AxisTerm]:
        """Cut an axis into consecutive segments; declines if that is impossible."""
        out = self._walker.solver.split_cat(layout, list(sizes))
        if out is None:
            raise Decline(f"cannot cut an axis of size {layout.size} into segments {list(sizes)}")
        return out

    def factor(self, layout: AxisTerm, sizes: Sequence[int]) -> list[AxisTerm]:
        """Factor an axis into row-major factors; declines if that is impossible."""
        out = self._walker.solver.split_prod(layout, list(sizes))
        if out is None:
            raise Decline(f"cannot factor an axis of size {layout.size} into {list(sizes)}")
        return out

    def concat(self, parts: Sequence[AxisTerm]) -> AxisTerm:
        """The axis made of ``parts`` one after another (as ``torch.cat`` does)."""
        return ConcatTerm(parts)

    def product(self, factors: Sequence[AxisTerm]) -> AxisTerm:
        """The axis made of ``factors`` in row-major order (as a ``reshape`` merging axes)."""
        return ProductTerm(factors)

    # -- tensors of the module -------------------------------------------------------------
    def tensor(self, attr: str, module: nn.Module | None = None) -> TracedTensor | None:
        """A parameter or buffer of the rule's module (or ``module``) as a member tensor."""
        owner = self.module if module is None else module
        t = getattr(owner, attr, None)
        if t is None:
            return None
        if not isinstance(t, torch.Tensor):
            raise Decline(f"attribute '{attr}' of {type(owner).__name__} is not a tensor")
        return self._walker.member(t)

    def call(self, module: nn.Module, *args: Any) -> list[AxisTerm]:
        """Apply the rule of a submodule (e.g. the activation inside BatchNormAct2d)."""
        rule = find_rule("call_module", None, module)
        if rule is None:
            raise Decline(f"no rule for submodule {type(module).__name__}")
        sub = copy.copy(self)
        sub.module = module
        return rule(sub, *args)
