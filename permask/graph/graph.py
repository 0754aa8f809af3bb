"""The permutation-group graph: which tensor axes one permutation must move together."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .layout import GroupAxis, Layout, layout_groups, render

if TYPE_CHECKING:
    import networkx
    import torch.fx

    from .unify import Reason

__all__ = ["PermutationGraph", "Group", "Member", "Observation", "FrozenAxis"]


@dataclass(frozen=True)
class Member:
    """Axis ``axis`` of parameter/buffer ``tensor`` carries the group, laid out as ``layout``.

    ``layout`` is explicit about structure: a segment of a concatenated axis, a factor of a
    flattened or grouped axis (see :mod:`permask.graph.layout`).
    """

    tensor: str
    axis: int
    layout: Layout


@dataclass(frozen=True)
class Observation:
    """Where a group's activations can be seen: fx node ``node``, axis ``axis``.

    ``item`` is the position among the node's output tensors (in ``tree_flatten`` order) when
    the node returns several (a tuple), else None. ``role`` is what the op is to activation
    matching, as its rule's registration says: "nonlinear", "residual", "pass_through" or None
    (see :func:`permask.graph.registry.register_role`).
    """

    node: str
    axis: int
    layout: Layout
    op: str
    target: str
    item: int | None = None
    role: str | None = None


@dataclass(frozen=True)
class FrozenAxis:
    """An axis held fixed, with why. ``kind`` is "tensor", "input" or "output"."""

    name: str
    axis: int
    size: int
    reasons: tuple[Reason, ...]
    kind: str

    def __str__(self) -> str:
        why = "; ".join(map(str, self.reasons)) or "unknown"
        return f"{self.kind} {self.name} axis {self.axis} (size {self.size}): {why}"


_CELL = 48  # widest column of the printout


def _cut(text: str, width: int) -> str:
    """``text`` cut to ``width`` with a visible marker."""
    return text if len(text) <= width else text[: width - 1] + "~"


def _examples(group: Group, width: int) -> str:
    """The first members that fit in ``width``, then ``(+N)`` for the rest (never cut off)."""
    names = [f"{m.tensor}[{m.axis}]" for m in group.members]
    for k in range(min(2, len(names)), 0, -1):
        more = f", ... (+{len(names) - k})" if len(names) > k else ""
        text = ", ".join(names[:k]) + more
        if len(text) <= width or k == 1:
            return text if len(text) <= width else _cut(names[0], width - len(more)) + more
    return ""


_COLLAPSE_ABOVE = 24  # groups: beyond this, repeated blocks print one row each
_BLOCK_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")


def _per_block(rows: list[tuple]) -> list[tuple]:
    """Rows of groups that differ only in block indices (``blocks.3.mlp`` / ``blocks.4.mlp``),
    size and #tensors alike, as one row ``blocks.{0..11}.mlp ... (x12)``; others as they are."""
    merged: dict[tuple, list[tuple]] = {}
    for row in rows:
        key = (_BLOCK_INDEX.sub("#", row[0]), row[1], row[2])
        merged.setdefault(key, []).append(row)
    out = []
    for (pattern, *_), same in merged.items():
        if len(same) == 1:
            out.append(same[0])
            continue
        columns = zip(*(_BLOCK_INDEX.findall(r[0]) for r in same))  # per index position
        name = pattern
        for values in columns:
            nums = sorted({int(v) for v in values})
            name = name.replace("#", str(nums[0]) if len(nums) == 1 else
                                f"{{{nums[0]}..{nums[-1]}}}", 1)  # fmt: skip
        first = same[0]
        out.append((f"{len(same)} x {name}", *first[1:]))
    return out


NO_RULE = "no rule for this op"
RULE_FAILED = "rule failed"


def describe_op(reason: Reason) -> str:
    """``torch.cumsum in module 'block.conv1.1' (node cumsum)`` for a :class:`Reason`."""
    where = f" in module '{reason.module}'" if reason.module else ""
    return f"{reason.op or reason.node}{where} (node {reason.node})"


@dataclass
class Group:
    """One permutation of ``size`` elements and every axis it moves."""

    name: str
    size: int
    members: list[Member] = field(default_factory=list)
    observations: list[Observation] = field(default_factory=list)

    @property
    def tensors(self) -> list[str]:
        return list(dict.fromkeys(m.tensor for m in self.members))


class PermutationGraph:
    """Groups of axes that must be permuted together, found by :func:`permask.trace`.

    Attributes:
        groups: name -> :class:`Group`, in trace order.
        tensors: parameter/buffer name -> one :class:`Layout` per axis (frozen axes are
            ``Fixed``). Only tensors that the traced forward uses appear here.
        frozen: axes held fixed (model inputs/outputs and tensor axes), with reasons.
        permuted_tensors, permutable_fraction, frozen_reasons, unruled_ops: read-only
            summaries of the above (see each).
        shapes: name -> shape of every parameter and buffer of the model.
        parameters: the names in ``shapes`` that are parameters (the rest are buffers).
        fx_graph: the traced ``torch.fx.Graph`` (node names match ``Observation.node``).
        frontend: how the graph was captured: "fx" (symbolic tracing; modules and torch
            functions) or "export" (``torch.export``; ATen operators).
        partly_fixed: permuted tensor axes that also have fixed parts (a ``fixed(n)`` factor or
            segment in their layout, e.g. RoPE's head dims inside q/k projections), kind "part",
            ``size`` the fixed positions (for a factor: its size), with the reasons.
    """

    def __init__(
        self,
        groups: dict[str, Group],
        tensors: dict[str, list[Layout]],
        frozen: list[FrozenAxis],
        shapes: dict[str, tuple[int, ...]],
        parameters: frozenset[str],
        fx_graph: torch.fx.Graph,
        frontend: str = "fx",
        partly_fixed: list[FrozenAxis] | None = None,
    ):
        self.groups = groups
        self.tensors = tensors
        self.frozen = frozen
        self.shapes = shapes
        self.parameters = parameters
        self.fx_graph = fx_graph
        self.frontend = frontend
        self.partly_fixed = partly_fixed or []

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self):
        return iter(self.groups.values())

    def __getitem__(self, name: str) -> Group:
        return self.groups[name]

    @property
    def permuted_tensors(self) -> dict[str, list[Layout]]:
        """Tensors with at least one axis that a permutation moves."""
        return {n: lays for n, lays in self.tensors.items() if any(layout_groups(x) for x in lays)}

    @property
    def permutable_fraction(self) -> float:
        """Fraction of the model's parameter elements in tensors that some group moves."""
        total = moved = 0
        permuted = self.permuted_tensors
        for name in self.parameters:
            shape = self.shapes[name]
            n = 1
            for s in shape:
                n *= s
            total += n
            if name in permuted:
                moved += n
        return moved / total if total else 0.0

    @property
    def frozen_reasons(self) -> Counter:
        """How many frozen tensor axes each reason message explains."""
        c: Counter = Counter()
        for f in self.frozen:
            for r in f.reasons[:1]:
                c[r.message] += 1
        return c

    @property
    def unruled_ops(self) -> list[Reason]:
        """Ops that froze tensor axes for want of a rule (no rule, or one that failed), one
        :class:`Reason` per op: ``op``, ``node`` and ``module`` (the module it is or sits in)."""
        out: dict[tuple, Reason] = {}
        for f in self.frozen:
            for r in f.reasons if f.kind == "tensor" else ():
                if r.message == NO_RULE or r.message.startswith(RULE_FAILED):
                    out.setdefault((r.node, r.op, r.module), r)
        return list(out.values())

    def __str__(self) -> str:
        rows = [("group", "size", "#tensors", "structure", "example members", "observed at")]
        for g in self:
            obs = next((o for o in g.observations if o.op != "get_attr"), None)
            shape = next((m.layout for m in g.members if not isinstance(m.layout, GroupAxis)), None)
            rows.append(
                (
                    g.name,
                    str(g.size),
                    str(len(g.tensors)),
                    render(shape, g.name) if shape is not None else "*",
                    _examples(g, _CELL),
                    f"{obs.node}[{obs.axis}]" if obs else "-",
                )
            )
        collapsed = len(rows) - 1 > _COLLAPSE_ABOVE
        if collapsed:
            rows = rows[:1] + _per_block(rows[1:])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        moved = self.permuted_tensors
        permuted, traced = len(moved), len(self.tensors)
        still = [n for n in self.tensors if n not in moved]
        lines = [
            f"PermutationGraph: {len(self)} groups, {permuted}/{traced} traced tensors permuted"
            + (f" (not: {', '.join(still)})" if 0 < len(still) <= 3 else "")
            + f", {self.permutable_fraction:.1%} of parameters"
            + (" (captured by torch.export)" if self.frontend == "export" else "")
        ]
        for r in rows:
            lines.append("  ".join(_cut(c, _CELL).ljust(min(w, _CELL)) for c, w in zip(r, widths)))
            lines[-1] = lines[-1].rstrip()
        lines.append(
            "(observed at: the fx node and output axis where activation matching sees the group)"
        )
        if collapsed:
            lines.append(
                "(N x a.{i..j}.b: N groups alike but for their block index, one row for all; "
                "graph.groups lists each)"
            )
        tensor_frozen = [f for f in self.frozen if f.kind == "tensor"]
        io = len(self.frozen) - len(tensor_frozen)
        lines.append(
            f"frozen: {len(self.frozen)} axes ({len(tensor_frozen)} of tensors, {io} of model "
            "inputs/outputs), by first reason:"
        )
        for msg, n in self.frozen_reasons.most_common(8):
            lines.append(f"  {n:4d} x {msg}")
        if self.partly_fixed:
            parts = Counter(f.reasons[0].message for f in self.partly_fixed if f.reasons)
            lines.append(
                f"partly fixed: {len(self.partly_fixed)} permuted tensor axes with fixed parts "
                "(graph.partly_fixed), by first reason:"
            )
            lines.extend(f"  {n:4d} x {msg}" for msg, n in parts.most_common(4))
        unruled = self.unruled_ops
        if unruled:
            lines.append(
                f"ops without a working rule ({len(unruled)}), each froze what it touches:"
            )
            lines.extend(f"  {describe_op(r)}" for r in unruled[:8])
            if len(unruled) > 8:
                lines.append(f"  ... and {len(unruled) - 8} more (graph.unruled_ops)")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"PermutationGraph(groups={len(self)}, tensors={len(self.tensors)})"

    def to_networkx(self) -> networkx.Graph:
        """Groups and tensors as nodes, membership (axis, layout) as edges."""
        import networkx as nx

        g = nx.MultiGraph()
        for grp in self:
            g.add_node(("group", grp.name), kind="group", size=grp.size)
        for name, lays in self.tensors.items():
            g.add_node(("tensor", name), kind="tensor", shape=self.shapes.get(name))
            for axis, lay in enumerate(lays):
                for grp in layout_groups(lay):
                    g.add_edge(("group", grp), ("tensor", name), axis=axis, layout=str(lay))
        return g
