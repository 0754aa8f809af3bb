"""Turn a finished :class:`~permask.graph.walk.Walker` into a :class:`PermutationGraph`.

1. An axis is *observed* when an activation carries it; a parameter axis that no activation
   shows and no rule proved free is frozen (nothing proves that permuting it is safe).
2. Every free union-find class of size > 1 that some parameter or buffer carries is a group,
   named after the first tensor axis that carries it (``fc.weight:0``, ``qkv.weight:0.1``).
3. Members (tensor axes), observations (activation axes) and frozen axes (with reasons) are
   read off the expanded layouts.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from .capture import target_name
from .graph import FrozenAxis, Group, Member, Observation, PermutationGraph
from .layout import Concat, Fixed, Layout, Product, layout_groups, locate
from .registry import TracedTensor, find_role
from .unify import AxisTerm, Reason
from .walk import Walker

__all__ = ["assemble"]


def assemble(
    walker: Walker, root: nn.Module, shapes: dict[str, tuple[int, ...]], frontend: str = "fx"
) -> PermutationGraph:
    """The permutation graph of a walked model (see the module doc)."""
    return _Assembly(walker).build(root, shapes, frontend)


class _Assembly:
    def __init__(self, walker: Walker):
        self.w = walker
        self.s = walker.solver

    def build(
        self, root: nn.Module, shapes: dict[str, tuple[int, ...]], frontend: str
    ) -> PermutationGraph:
        activations = self.activation_axes()
        self.freeze_unobserved(activations)
        names = self.group_names()
        groups = {names[vid]: Group(names[vid], self.s.vars[vid].size) for vid in sorted(names)}
        tensors, frozen, parts = self.members(groups, names)
        for node, item, axis, ax in activations:
            lay = self.s.expand(ax, names)
            for g in layout_groups(lay):
                groups[g].observations.append(
                    Observation(
                        node.name, axis, lay, node.op, target_name(node), item, self.role(node)
                    )
                )
        frozen.extend(self.frozen_io())
        groups = {k: g for k, g in groups.items() if g.members}
        params = frozenset(n for n, _ in root.named_parameters())
        return PermutationGraph(
            groups, tensors, frozen, shapes, params, self.w.gm.graph, frontend, parts
        )

    def role(self, node: fx.Node) -> str | None:
        module = self.w.gm.get_submodule(node.target) if node.op == "call_module" else None
        return find_role(node.op, node.target, module)

    def leaf_ids(self, axes: list[AxisTerm]) -> dict[int, None]:
        return {leaf.id: None for ax in axes for leaf in self.s.leaves(ax)}

    def activation_axes(self) -> list[tuple[fx.Node, int | None, int, AxisTerm]]:
        """(node, item of a tuple output or None, axis, term) of every activation axis."""
        out = []
        for node, val in self.w.env.items():
            if node.op in ("output", "get_attr"):
                continue
            for item, v in enumerate(_leaves(val)):
                if isinstance(v, TracedTensor):
                    out.extend(
                        (node, None if v is val else item, i, ax) for i, ax in enumerate(v.axes)
                    )
        return out

    def freeze_unobserved(self, activations: list) -> None:
        """Freeze parameter axes that neither an activation shows nor a rule proved free."""
        observed = self.leaf_ids([ax for *_, ax in activations])
        inner = [
            ax for v in _leaves(self.w.inner_values) if isinstance(v, TracedTensor) for ax in v.axes
        ]
        observed.update(self.leaf_ids(inner))
        proven = {self.s.find(v).id for v in self.s.vars if v.proven}
        for vid in self.member_ids():
            if vid not in observed and vid not in proven:
                self.s.freeze(
                    self.s.vars[vid], Reason("parameter axis never reaches an activation")
                )

    def member_ids(self) -> dict[int, None]:
        return self.leaf_ids([ax for val in self.w.members.values() for ax in val.axes])

    def group_names(self) -> dict[int, str]:
        """Name each group after the first tensor axis that carries it, e.g. ``fc.weight:0``,
        ``qkv.weight:0.1`` (factor 1 of that axis) or ``conv.weight:1[0:6]`` (a segment)."""
        vars_ = self.s.vars
        ids = {v: f"#{v}" for v in self.member_ids() if not vars_[v].frozen and vars_[v].size > 1}
        first: dict[str, str] = {}
        for tname, val in self.w.members.items():
            for axis, ax in enumerate(val.axes):
                lay = self.s.expand(ax, ids)
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

    def members(self, groups: dict[str, Group], names: dict[int, str]):
        """Each tensor's layouts; members added to ``groups``; its frozen axes of size > 1."""
        tensors: dict[str, list] = {}
        frozen: list[FrozenAxis] = []
        parts: list[FrozenAxis] = []  # permuted axes with fixed factors or segments
        for tname, val in self.w.members.items():
            tensors[tname] = [self.s.expand(ax, names) for ax in val.axes]
            for axis, lay in enumerate(tensors[tname]):
                gs = layout_groups(lay)
                for g in gs:
                    groups[g].members.append(Member(tname, axis, lay))
                if not gs and lay.size > 1:
                    reasons = self.reasons(val.axes[axis])
                    frozen.append(FrozenAxis(tname, axis, lay.size, reasons, "tensor"))
                elif gs and (fixed := _fixed_parts(lay)):
                    reasons = self.reasons(val.axes[axis], frozen_only=True)
                    parts.append(FrozenAxis(tname, axis, fixed, reasons, "part"))
        return tensors, frozen, parts

    def frozen_io(self) -> list[FrozenAxis]:
        out = []
        for kind, name, val in self.w.io_frozen:
            for v in _leaves(val):
                if isinstance(v, TracedTensor):
                    for axis, ax in enumerate(v.axes):
                        if ax.size > 1:
                            out.append(FrozenAxis(name, axis, ax.size, self.reasons(ax), kind))
        return out

    def reasons(self, ax: AxisTerm, frozen_only: bool = False) -> tuple[Reason, ...]:
        out: dict[Reason, None] = {}
        for leaf in self.s.leaves(ax):
            if leaf.frozen or not frozen_only:
                out.update(dict.fromkeys(leaf.reasons))
        return tuple(out)


def _fixed_parts(layout: Layout) -> int:
    """How many positions of a structured layout are fixed (0 for a plain group or none)."""
    if isinstance(layout, Fixed):
        return layout.size
    if isinstance(layout, Concat):
        return sum(_fixed_parts(p) for p in layout.parts)
    if isinstance(layout, Product):
        return max((f.size for f in layout.factors if isinstance(f, Fixed)), default=0)
    return 0


def _leaves(value: Any) -> list:
    leaves, _ = tree_flatten(value, is_leaf=lambda x: isinstance(x, TracedTensor))
    return leaves
