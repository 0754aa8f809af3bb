"""Union-find over group axes, with structure (concat / product) and freezing.

While tracing, every tensor axis gets a mutable *axis term* (:data:`AxisTerm`) built from
:class:`AxisVar` leaves and :class:`ConcatTerm` / :class:`ProductTerm` nodes (the trace-time
counterparts of the public :class:`~permask.graph.layout.Concat` and
:class:`~permask.graph.layout.Product`). Rules relate axes with :meth:`AxisUnion.unify`; a var
that must equal a structured term is *defined* as it (so a channel axis split by
``torch.split`` becomes a concat of new vars), and anything two terms cannot be proven to share
is frozen. Freezing is always sound: a frozen axis is never permuted. :meth:`AxisUnion.expand`
turns the result into the immutable public layouts of :mod:`permask.graph.layout`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .layout import Concat, Fixed, GroupAxis, Layout, Product

MAX_REASONS = 4


@dataclass(frozen=True)
class Reason:
    """Why an axis is frozen: the op, the fx node and module path involved, and a message."""

    message: str
    node: str | None = None
    op: str | None = None
    module: str | None = None

    def __str__(self) -> str:
        where = ", ".join(
            f"{k}={v}"
            for k, v in (("op", self.op), ("node", self.node), ("module", self.module))
            if v
        )
        return f"{self.message} ({where})" if where else self.message


class AxisVar:
    """A leaf axis of the union-find forest."""

    __slots__ = ("size", "parent", "defn", "frozen", "reasons", "id", "name", "proven")

    def __init__(self, size: int, vid: int, name: str, proven: bool = False):
        self.size = size
        self.parent: AxisVar = self
        self.defn: AxisTerm | None = None
        self.frozen = False
        self.reasons: list[Reason] = []
        self.id = vid
        self.name = name
        self.proven = proven  # created free by a rule (not merely a parameter axis)

    def __repr__(self) -> str:
        return f"AxisVar({self.name}, {self.size})"


class ConcatTerm:
    __slots__ = ("parts", "size")

    def __init__(self, parts):
        self.parts = tuple(parts)
        self.size = sum(p.size for p in self.parts)


class ProductTerm:
    __slots__ = ("factors", "size")

    def __init__(self, factors):
        self.factors = tuple(factors)
        n = 1
        for f in self.factors:
            n *= f.size
        self.size = n


AxisTerm = AxisVar | ConcatTerm | ProductTerm


class LayoutMismatch(Exception):
    """Two layouts of different sizes were unified: a rule is wrong about a shape."""


class AxisUnion:
    """The union-find over the axis vars of one trace (it owns them all)."""

    def __init__(self) -> None:
        self.vars: list[AxisVar] = []

    # -- creation ---------------------------------------------------------------------------
    def new(self, size: int, name: str, proven: bool = False) -> AxisVar:
        v = AxisVar(size, len(self.vars), name, proven)
        self.vars.append(v)
        return v

    def fixed(self, size: int, reason: Reason, name: str = "fixed") -> AxisVar:
        v = self.new(size, name)
        v.frozen = True
        v.reasons.append(reason)
        return v

    # -- union-find ---------------------------------------------------------------------------
    def find(self, v: AxisVar) -> AxisVar:
        root = v
        while root.parent is not root:
            root = root.parent
        while v.parent is not root:
            v.parent, v = root, v.parent
        return root

    def resolve(self, layout: AxisTerm) -> AxisTerm:
        """Follow definitions and flatten until the top node is a root var or a structure."""
        while True:
            if isinstance(layout, AxisVar):
                root = self.find(layout)
                if root.defn is None:
                    return root
                layout = root.defn
            elif isinstance(layout, ConcatTerm):
                parts = self._flat(layout, ConcatTerm)
                if len(parts) == 1:
                    layout = parts[0]
                    continue
                return ConcatTerm(parts) if parts else layout
            else:
                factors = self._flat(layout, ProductTerm)
                if len(factors) == 1:
                    layout = factors[0]
                    continue
                return ProductTerm(factors) if factors else layout

    def _flat(self, layout: AxisTerm, kind: type) -> list[AxisTerm]:
        """Children of nested ``kind`` nodes (definitions followed), without neutral elements."""
        neutral = 0 if kind is ConcatTerm else 1
        out: list[AxisTerm] = []
        stack = [layout]
        while stack:
            node = stack.pop()
            if isinstance(node, AxisVar):
                root = self.find(node)
                node = root if root.defn is None else root.defn
            if isinstance(node, kind):
                stack.extend(reversed(_children(node)))
            elif node.size != neutral:
                out.append(node)
        return out

    def leaves(self, layout: AxisTerm) -> list[AxisVar]:
        """Root vars (without definition) under a layout."""
        out: list[AxisVar] = []
        stack = [layout]
        while stack:
            node = stack.pop()
            if isinstance(node, AxisVar):
                root = self.find(node)
                if root.defn is None:
                    out.append(root)
                else:
                    stack.append(root.defn)
            else:
                stack.extend(_children(node))
        return out

    # -- constraints ------------------------------------------------------------------------
    def freeze(self, layout: AxisTerm, reason: Reason) -> None:
        for leaf in self.leaves(layout):
            if not leaf.frozen:
                leaf.frozen = True
            if len(leaf.reasons) < MAX_REASONS and reason not in leaf.reasons:
                leaf.reasons.append(reason)

    def unify(self, a: AxisTerm, b: AxisTerm, reason: Reason) -> None:
        """Constrain two axes to be permuted identically; freeze what cannot be aligned."""
        if a.size != b.size:
            raise LayoutMismatch(f"cannot unify axes of size {a.size} and {b.size}")
        if a.size <= 1:
            return
        ra, rb = self.resolve(a), self.resolve(b)
        if ra is rb:
            return
        if isinstance(ra, AxisVar) and isinstance(rb, AxisVar):
            self._union(ra, rb, reason)
        elif isinstance(ra, AxisVar):
            self._define(ra, rb, reason)
        elif isinstance(rb, AxisVar):
            self._define(rb, ra, reason)
        elif isinstance(ra, ConcatTerm) or isinstance(rb, ConcatTerm):
            self._unify_pieces(ra, rb, reason, ConcatTerm)
        else:
            self._unify_pieces(ra, rb, reason, ProductTerm)

    def _union(self, a: AxisVar, b: AxisVar, reason: Reason) -> None:
        if b.id < a.id:
            a, b = b, a
        b.parent = a
        a.frozen = a.frozen or b.frozen
        for r in b.reasons:
            if len(a.reasons) < MAX_REASONS and r not in a.reasons:
                a.reasons.append(r)
        da, db = a.defn, b.defn
        if da is None and db is not None:
            a.defn = db
        if a.frozen and a.defn is not None:
            self.freeze(a.defn, a.reasons[0] if a.reasons else reason)
        if da is not None and db is not None:
            self.unify(da, db, reason)

    def _define(self, v: AxisVar, layout: AxisTerm, reason: Reason) -> None:
        if any(leaf is v for leaf in self.leaves(layout)):
            self.freeze(v, reason)
            self.freeze(layout, reason)
            return
        v.defn = layout
        if v.frozen:
            self.freeze(layout, v.reasons[0] if v.reasons else reason)

    def _unify_pieces(self, a: AxisTerm, b: AxisTerm, reason: Reason, kind: type) -> None:
        """Unify two concats (or two products) on the common refinement of their pieces."""
        pa, pb = self._flat(a, kind), self._flat(b, kind)
        if kind is ConcatTerm:
            bounds = sorted(set(_cumsum(pa)) | set(_cumsum(pb)))
            sizes = [y - x for x, y in zip([0] + bounds[:-1], bounds)]
            sa, sb = self.split_cat(a, sizes), self.split_cat(b, sizes)
        else:
            chain = sorted(set(_cumprod(pa)) | set(_cumprod(pb)))
            if any(y % x for x, y in zip(chain, chain[1:])):
                sa = sb = None
            else:
                sizes = [y // x for x, y in zip([1] + chain[:-1], chain)]
                sa, sb = self.split_prod(a, sizes), self.split_prod(b, sizes)
        if sa is None or sb is None:
            why = Reason(f"cannot align structured axes: {reason.message}", *_where(reason))
            self.freeze(a, why)
            self.freeze(b, why)
            return
        for x, y in zip(sa, sb):
            self.unify(x, y, reason)

    # -- refinement ----------------------------------------------------------------------------
    def split_cat(self, layout: AxisTerm, sizes: list[int]) -> list[AxisTerm] | None:
        """Cut an axis into consecutive segments of ``sizes``; None if a cut is impossible.

        A root var is defined as the concat of new vars; a product is cut along its slowest
        factor (``(a x b)`` with ``a = [a1 | a2]`` is ``[(a1 x b) | (a2 x b)]``).
        """
        assert sum(sizes) == layout.size
        pieces = self._flat(layout, ConcatTerm)
        out: list[AxisTerm] = []
        for s in sizes:
            taken: list[AxisTerm] = []
            need = s
            while need > 0:
                head = pieces.pop(0)
                if head.size <= need:
                    taken.append(head)
                    need -= head.size
                    continue
                cut = self._cut(head, need)
                if cut is None:
                    return None
                taken.append(cut[0])
                pieces.insert(0, cut[1])
                need = 0
            out.append(
                taken[0] if len(taken) == 1 else ConcatTerm(taken) if taken else _empty(self)
            )
        return out

    def _cut(self, layout: AxisTerm, at: int) -> tuple[AxisTerm, AxisTerm] | None:
        layout = self.resolve(layout)
        if not isinstance(layout, AxisVar) and self._all_frozen(layout):
            layout = self.fixed(layout.size, Reason("frozen"), "fixed")
        if isinstance(layout, AxisVar):
            left = self.new(at, f"{layout.name}[:{at}]", layout.proven)
            right = self.new(layout.size - at, f"{layout.name}[{at}:]", layout.proven)
            self._define(layout, ConcatTerm([left, right]), Reason("split"))
            return left, right
        if isinstance(layout, ProductTerm):
            head, rest = layout.factors[0], layout.factors[1:]
            inner = layout.size // head.size
            if at % inner:
                return None
            cut = self._cut(head, at // inner)
            if cut is None:
                return None
            return ProductTerm([cut[0], *rest]), ProductTerm([cut[1], *rest])
        return None  # a ConcatTerm is already flattened into pieces

    def split_prod(self, layout: AxisTerm, sizes: list[int]) -> list[AxisTerm] | None:
        """Factor an axis into row-major factors of ``sizes``; None if impossible."""
        n = 1
        for s in sizes:
            n *= s
        assert n == layout.size
        factors = self._flat(layout, ProductTerm)
        out: list[AxisTerm] = []
        for s in sizes:
            if s == 1:
                out.append(_unit(self))
                continue
            taken: list[AxisTerm] = []
            need = s
            while need > 1:
                head = self.resolve(factors.pop(0))
                if head.size == 1:
                    continue
                if need % head.size == 0:
                    taken.append(head)
                    need //= head.size
                    continue
                if head.size % need:
                    return None
                if not isinstance(head, AxisVar):
                    head = self._factorable(head, head.size // need)
                    if head is None:
                        return None
                    if isinstance(head, ProductTerm):
                        factors[0:0] = list(head.factors)
                        continue
                slow = self.new(need, f"{head.name}/{need}", head.proven)
                fast = self.new(head.size // need, f"{head.name}%{need}", head.proven)
                self._define(head, ProductTerm([slow, fast]), Reason("reshape"))
                taken.append(slow)
                factors.insert(0, fast)
                need = 1
            out.append(taken[0] if len(taken) == 1 else ProductTerm(taken))
        return out

    def _all_frozen(self, layout: AxisTerm) -> bool:
        return all(leaf.frozen for leaf in self.leaves(layout))

    def _factorable(self, layout: AxisTerm, fast: int) -> AxisTerm | None:
        """``layout`` as ``(slow x fast)`` so :meth:`split_prod` can cut it, or None.

        A fully frozen layout carries no structure worth keeping: one fixed axis. A concat whose
        segments are all multiples of ``fast`` becomes ``([s_1 | s_2 | ...] x fast)`` once the
        segments' fast factors are tied to one permutation (e.g. per-head-group convs
        concatenated and then reshaped into (heads, head_dim), or q, k, v biases concatenated
        and reshaped into (3, heads, head_dim)).
        """
        if self._all_frozen(layout):
            return self.fixed(layout.size, Reason("frozen"), "fixed")
        if not isinstance(layout, ConcatTerm):
            return None
        parts = self._flat(layout, ConcatTerm)
        if any(p.size % fast for p in parts):
            return None
        slows, fasts = [], []
        for p in parts:
            sp = self.split_prod(p, [p.size // fast, fast])
            if sp is None:
                return None
            slows.append(sp[0])
            fasts.append(sp[1])
        for f in fasts[1:]:
            self.unify(fasts[0], f, Reason("reshape ties the segments' inner factor"))
        return ProductTerm([ConcatTerm(slows), fasts[0]])

    # -- results ------------------------------------------------------------------------------
    def expand(self, layout: AxisTerm, names: dict[int, str]) -> Layout:
        """Immutable public layout; ``names`` maps root var ids to group names."""
        if isinstance(layout, AxisVar):
            root = self.find(layout)
            if root.defn is not None:
                return self.expand(root.defn, names)
            if root.frozen or root.id not in names:
                return Fixed(root.size)
            return GroupAxis(names[root.id], root.size)
        if isinstance(layout, ConcatTerm):
            parts: list[Layout] = []
            for p in layout.parts:
                e = self.expand(p, names)
                if e.size == 0:
                    continue
                sub = e.parts if isinstance(e, Concat) else (e,)
                for s in sub:
                    if parts and isinstance(parts[-1], Fixed) and isinstance(s, Fixed):
                        parts[-1] = Fixed(parts[-1].size + s.size)
                    else:
                        parts.append(s)
            if len(parts) == 1:
                return parts[0]
            return Concat(tuple(parts)) if parts else Fixed(0)
        factors: list[Layout] = []
        for f in layout.factors:
            e = self.expand(f, names)
            sub = e.factors if isinstance(e, Product) else (e,)
            for s in sub:
                if s.size == 1:
                    continue
                if factors and isinstance(factors[-1], Fixed) and isinstance(s, Fixed):
                    factors[-1] = Fixed(factors[-1].size * s.size)
                else:
                    factors.append(s)
        if not factors:
            return Fixed(layout.size)
        return factors[0] if len(factors) == 1 else Product(tuple(factors))


def _children(node: ConcatTerm | ProductTerm) -> tuple[AxisTerm, ...]:
    return node.parts if isinstance(node, ConcatTerm) else node.factors


def _unit(solver: AxisUnion) -> AxisVar:
    v = solver.new(1, "unit")
    v.frozen = True
    return v


def _empty(solver: AxisUnion) -> AxisVar:
    v = solver.new(0, "empty")
    v.frozen = True
    return v


def _cumsum(parts: list[AxisTerm]) -> list[int]:
    out, acc = [], 0
    for p in parts:
        acc += p.size
        out.append(acc)
    return out


def _cumprod(factors: list[AxisTerm]) -> list[int]:
    out, acc = [], 1
    for f in factors:
        acc *= f.size
        out.append(acc)
    return out


def _where(reason: Reason) -> tuple[str | None, str | None, str | None]:
    return reason.node, reason.op, reason.module
