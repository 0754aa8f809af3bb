"""Axis layouts: how a physical tensor axis is built from permutation groups.

A *layout* describes one axis of a parameter, buffer or activation as a tree whose leaves are
group axes (permuted by one permutation) or fixed axes (never permuted), combined by

* ``Concat`` -- segments laid end to end (``torch.cat``, ``split``, slices), and
* ``Product`` -- a row-major Kronecker product, slowest factor first (flatten of C*H*W into a
  Linear is ``Product(group_C, Fixed(H*W))``; a grouped conv's channels are
  ``Product(group_blocks, group_within)``).

Permuting any physical axis is then one function, :func:`layout_index`. The public classes here
are immutable; :mod:`permask.graph.unify` builds them with union-find while tracing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "Fixed",
    "GroupAxis",
    "Concat",
    "Product",
    "Layout",
    "layout_index",
    "layout_groups",
    "permute_axes",
]


@dataclass(frozen=True)
class Fixed:
    """An axis (or part of one) that is never permuted."""

    size: int

    def __str__(self) -> str:
        return f"fixed({self.size})"


@dataclass(frozen=True)
class GroupAxis:
    """An axis moved by the permutation of group ``group``."""

    group: str
    size: int

    def __str__(self) -> str:
        return self.group


@dataclass(frozen=True)
class Concat:
    """Segments laid end to end along one axis."""

    parts: tuple[Layout, ...]

    @property
    def size(self) -> int:
        return sum(p.size for p in self.parts)

    def __str__(self) -> str:
        return "[" + " | ".join(map(str, self.parts)) + "]"


@dataclass(frozen=True)
class Product:
    """Row-major product of axes, slowest first: index ``i*size(b) + j`` for factors (a, b)."""

    factors: tuple[Layout, ...]

    @property
    def size(self) -> int:
        n = 1
        for f in self.factors:
            n *= f.size
        return n

    def __str__(self) -> str:
        return "(" + " x ".join(map(str, self.factors)) + ")"


Layout = Fixed | GroupAxis | Concat | Product


def layout_index(
    layout: Layout, perms: Mapping[str, torch.Tensor], device: torch.device | None = None
) -> torch.Tensor:
    """Index map of an axis: position ``i`` of the permuted axis takes old position ``idx[i]``.

    Groups missing from ``perms`` are left in place.
    """
    if isinstance(layout, Fixed):
        return torch.arange(layout.size, device=device)
    if isinstance(layout, GroupAxis):
        p = perms.get(layout.group)
        return torch.arange(layout.size, device=device) if p is None else p.to(device)
    if isinstance(layout, Concat):
        out, offset = [], 0
        for part in layout.parts:
            out.append(layout_index(part, perms, device) + offset)
            offset += part.size
        return torch.cat(out)
    idx = torch.zeros(1, dtype=torch.long, device=device)
    for f in layout.factors:
        idx = (idx[:, None] * f.size + layout_index(f, perms, device)[None, :]).reshape(-1)
    return idx


def permute_axes(
    t: torch.Tensor, layouts: Sequence[Layout], perms: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """``t`` with every axis that holds a group moved by ``perms`` (:func:`layout_index`);
    ``layouts`` are its axes' layouts. ``t`` itself when no axis holds a group."""
    for axis, lay in enumerate(layouts):
        if layout_groups(lay):
            t = t.index_select(axis, layout_index(lay, perms, t.device))
    return t


def layout_groups(layout: Layout) -> list[str]:
    """Names of the groups in a layout, in order of appearance (without repeats)."""
    if isinstance(layout, Fixed):
        return []
    if isinstance(layout, GroupAxis):
        return [layout.group]
    children = layout.parts if isinstance(layout, Concat) else layout.factors
    seen: dict[str, None] = {}
    for c in children:
        seen.update(dict.fromkeys(layout_groups(c)))
    return list(seen)


def group_element_map(layout: Layout, group: str) -> torch.Tensor:
    """For each position of the axis, which element of ``group`` it carries (-1 for none).

    Activation matching uses this to find the channels that belong to a group at an
    observation point (a group can appear in a segment, or repeated inside a product).
    """
    if isinstance(layout, Fixed):
        return torch.full((layout.size,), -1, dtype=torch.long)
    if isinstance(layout, GroupAxis):
        if layout.group == group:
            return torch.arange(layout.size)
        return torch.full((layout.size,), -1, dtype=torch.long)
    if isinstance(layout, Concat):
        return torch.cat([group_element_map(p, group) for p in layout.parts])
    out = torch.full((1,), -1, dtype=torch.long)
    for f in layout.factors:
        inner = group_element_map(f, group)
        out = torch.maximum(out[:, None], inner[None, :]).reshape(-1)
    return out


def locate(layout: Layout, group: str) -> str | None:
    """Where ``group`` first sits in ``layout``: ``""`` (the whole axis), ``"[a:b]"`` (a
    segment), ``".i"`` (factor i of a product), nested as needed; None if absent."""
    if isinstance(layout, GroupAxis):
        return "" if layout.group == group else None
    if isinstance(layout, Concat):
        offset = 0
        for part in layout.parts:
            where = locate(part, group)
            if where is not None:
                return f"[{offset}:{offset + part.size}]{where}"
            offset += part.size
    elif isinstance(layout, Product):
        for i, f in enumerate(layout.factors):
            where = locate(f, group)
            if where is not None:
                return f".{i}{where}"
    return None


def render(layout: Layout, group: str) -> str:
    """Short form of ``layout`` with ``group`` as ``*`` and other groups as ``g<size>``."""
    if isinstance(layout, GroupAxis):
        return "*" if layout.group == group else f"g{layout.size}"
    if isinstance(layout, Fixed):
        return f"fixed({layout.size})"
    if isinstance(layout, Concat):
        return "[" + " | ".join(render(p, group) for p in layout.parts) + "]"
    return "(" + " x ".join(render(f, group) for f in layout.factors) + ")"
