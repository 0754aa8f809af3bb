"""Weight matching (Git Re-Basin, Ainsworth et al. 2023): coordinate descent over groups.

For group g, with every other group held at its current estimate, the score of matching A's
element j to B's element i is ``sum over member axes of g: <W_B[i], (P W_A)[j]>``, where ``P``
permutes every other axis of the tensor (and the other groups that share g's axis, e.g. the
within-block order of a grouped conv) by the current estimates. A linear assignment gives the
best permutation of g; groups are visited until a whole sweep improves none.

Visiting order and the first sweep: the first sweep takes the groups from input to output (by
the first use of their tensors in the forward), later sweeps a seeded random order (Git
Re-Basin). In the first sweep a group is solved layer-wise: from those of its terms whose
tensor's other axes are fixed, given in ``init``, or belong to groups already solved in that
sweep; its other terms wait for the next sweep. Scoring a group against neighbours still at the
identity start makes it fit noise: inner groups fitted around a residual stream still at the
identity, or a stream fitted to blocks whose hidden groups are still at the identity, reach a
fixed point that no single-group move leaves (docs/alignment.md, "Weight matching", names six
timm architectures that stop at such fixed points when every term is scored at once).

The descent stops when no score is left to update: a group is re-scored only when a group its
score depends on has changed, and a new permutation is kept only if it raises the group's score
by more than 1e-7 relative, so after the first sweep a sweep that changes no estimate (and no
joint move) ends it; or after ``max_iter`` sweeps (default 100).

Structures of blocks x within (a grouped conv's or GroupNorm's groups, attention heads x
head_dim, and deeper nestings such as grouped convs whose group counts change) get a joint move
as well: when the outermost group is visited, it and every group nested in it are re-solved
together from the full scores of their chains (:func:`permask.match.assign.assign`), and kept if
the objective of the tensors they touch improves. Alternating single-group updates alone stall
there: a wrong block order is compensated by wrong within orders, and no single group can
improve. A joint move is re-tried whenever a group its tensors depend on has changed, so a
finished run is a fixed point of the joint moves as well as of the single-group ones.

A group's scores are kept as one running sum of its member axes' contributions, each updated
only when a group it depends on has changed, and then only for the elements that moved:
``B[D] (A[new[D]] - A[old[D]])^T``. A group whose contributions are all current is skipped
(re-solving it would give the same answer). The same result as re-solving everything, up to
float32 rounding in the running scores (far below the 1e-7 relative improvement a move needs),
at a fraction of the matrix products; memory is ``4 * n^2`` bytes per group, kept while all
groups' fit in :data:`KEEP_SCORES_BYTES` (beyond it, scores are computed anew at each visit).

Each LAP is solved in a background thread (scipy and lapx release the GIL) while the next
groups in the visiting order are scored; a group first waits for the pending LAPs of the groups
its scores depend on, so the result is exactly that of the sequential loop (tested).
Parameters only (no BatchNorm running statistics), held in the models' own dtype (a bfloat16
pair is not copied to float32) and multiplied in float32, one tensor at a time and a tensor
larger than :data:`PIECE_BYTES` slice by slice, on the given device.

>>> import torch, permask
>>> from permask.match import weight_matching
>>> a = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
>>> graph = permask.trace(a, torch.randn(1, 8))
>>> pi = permask.random_permutation(graph)
>>> b = permask.permute_model(a, pi, graph)
>>> res = weight_matching(a.state_dict(), b.state_dict(), graph)
>>> permask.Permutation(res.perms) == pi
True

Timings and sweeps: docs/benchmarks.md, "Weight matching, two random-init torchvision
resnet50s" and "Joint updates of structured groups"; the visiting orders compared:
docs/alignment.md, "Weight matching".
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..graph import PermutationGraph
from ..graph.layout import (
    Layout,
    group_element_map,
    layout_groups,
    layout_index,
)
from .assign import assign, margin, parents
from .lap import solve_lap
from .points import axis_units

__all__ = ["WeightMatchResult", "weight_matching", "weight_scores"]


@dataclass
class WeightMatchResult:
    """Permutation per group, the objective sum <W_B, P W_A> over permuted parameters, sweeps
    (passes over the groups that solved at least one group); per optimised group the margin of
    its assignment on its final scores and its ties (:func:`permask.match.assign.margin`)."""

    perms: dict[str, torch.Tensor]
    objective: float
    iterations: int
    margins: dict[str, float] = field(default_factory=dict)  # per group: assign.margin
    ties: dict[str, int] = field(default_factory=dict)  # groups with tied elements: how many


@dataclass(frozen=True)
class _ScoreTerm:
    """One tensor axis's term of a group's score matrix: the elements of ``groups`` on that axis,
    B's rows gathered when needed (:attr:`b`; B's tensor is held, not copied), A's re-gathered
    per estimate (every axis permuted by the current estimates except ``groups`` on ``axis``)."""

    groups: tuple[str, ...]  # one group, or (outer, inner) whose elements are pairs
    tensor: str
    axis: int
    rows: torch.Tensor | None  # [n, k] positions of each element's k replicas; None: the axis
    source: torch.Tensor  # B's tensor
    depends: frozenset[str] = frozenset()  # groups whose estimate changes this contribution
    across: frozenset[str] = frozenset()  # those of them on the tensor's other axes

    @property
    def b(self) -> torch.Tensor:
        """``[n, k * rest]`` float32: B's rows of the elements (a view of a float32 tensor where
        no gather is needed)."""
        return _f32(_gather(self.source, self.axis, self.rows))


def _rows(layout: Layout, group: str, size: int, device: torch.device) -> torch.Tensor | None:
    elem = group_element_map(layout, group)
    if torch.equal(elem, torch.arange(size)):  # the axis is the group: no gather needed
        return None
    pos = (elem >= 0).nonzero().flatten()
    order = torch.argsort(elem[pos], stable=True)
    return pos[order].reshape(size, -1).to(device)


def _f32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, the dtype of every score product (no copy when it already is)."""
    return t.to(torch.float32)


def _gather(t: torch.Tensor, axis: int, rows: torch.Tensor | None) -> torch.Tensor:
    """``[n, rest]``: the elements' replicas on ``axis`` (``rows``) against every other entry."""
    t = t.movedim(axis, 0)
    return t.reshape(t.shape[0], -1) if rows is None else t[rows].reshape(rows.shape[0], -1)


def weight_matching(
    params_a: Mapping[str, torch.Tensor],
    params_b: Mapping[str, torch.Tensor],
    graph: PermutationGraph,
    *,
    seed: int = 0,
    max_iter: int = 100,
    solver: str = "auto",
    init: Mapping[str, torch.Tensor] | None = None,
    only: Collection[str] | None = None,
    overlap: bool = True,
    keep_scores: bool | None = None,
) -> WeightMatchResult:
    """Permutation of A's groups maximising ``sum <W_B, P W_A>`` over the graph's parameters.

    ``init`` gives starting permutations (default identity); with ``only``, just those groups
    are optimised and every other group stays at its ``init`` value (activation matching uses
    this for groups that no activation shows, e.g. heads inside ``nn.MultiheadAttention``).
    ``overlap`` solves each LAP in a background thread while the next groups that do not depend
    on it are scored; the result is the same as without. At most ``max_iter`` sweeps.
    ``keep_scores`` keeps every group's running scores between visits (default: while they
    take at most :data:`KEEP_SCORES_BYTES`); without, a group's scores are computed anew at each
    visit, so that a few cost matrices at a time are held beyond the two models.
    """
    descent = _Descent(
        params_a, params_b, graph, seed=seed, solver=solver, init=init, only=only,
        overlap=overlap, keep_scores=keep_scores,
    )  # fmt: skip
    descent.settle(max_iter)
    return descent.result()


def weight_scores(
    params_a: Mapping[str, torch.Tensor],
    params_b: Mapping[str, torch.Tensor],
    graph: PermutationGraph,
    perms: Mapping[str, torch.Tensor],
    groups: Collection[str],
) -> dict[str, torch.Tensor]:
    """Per group in ``groups``, its ``[n_a, n_b]`` weight-matching scores with every other group
    at ``perms``: ``sum over member axes of <W_B[i], (P W_A)[j]>`` (module docstring)."""
    descent = _Descent(params_a, params_b, graph, init=perms, only=groups, overlap=False)
    return {g: descent.scores(g) for g in groups}


class _Descent:
    """One weight matching's coordinate descent: estimates, running scores, seeded order.

    Built with every optimised group (``only``, default all) at its ``init`` estimate (default
    the identity) and every score stale; arguments as :func:`weight_matching`'s. ``perms`` holds
    the current estimates (on B's device), ``iterations`` the sweeps run so far.

    - ``visit(g)``: bring g's running score up to date and solve its LAP with every other group
      fixed; the answer replaces g's estimate only if it raises g's score by more than 1e-7
      relative. Inside :meth:`settle` the LAP may still be pending when it returns (it is taken
      before anything that depends on it); outside, it is solved before it returns. For the outer
      group of a blocks x within structure, then :meth:`joint_move` if a group its tensors
      depend on has changed since the last try.
    - ``joint_move(outer)``: re-solve that structure's blocks and within orders together; kept
      only if the objective of the tensors it touches improves.
    - ``sweep()``: visit every optimised group once, from input to output on the first sweep
      (terms on groups still at their identity start wait) and in a seeded random order after.
    - ``settle(max_iter)``: sweep until no group can improve (nothing stale) or ``max_iter``
      sweeps in all, LAPs in a background thread (``overlap``) or one by one.
    - ``result()``: the :class:`WeightMatchResult` at the current estimates.

    The same inputs and ``seed`` give the same estimates, objective and sweeps, with or without
    ``overlap``. :func:`weight_matching` is ``settle(max_iter)`` then ``result()``.

    >>> import torch, permask
    >>> from permask.match.weight import _Descent
    >>> a = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> graph = permask.trace(a, torch.randn(1, 8))
    >>> pi = permask.random_permutation(graph)
    >>> b = permask.permute_model(a, pi, graph)
    >>> d = _Descent(a.state_dict(), b.state_dict(), graph)
    >>> d.visit("0.weight:0")  # the only hidden group: solved at once
    >>> torch.equal(d.perms["0.weight:0"], pi["0.weight:0"])
    True
    >>> d.settle()  # nothing is stale any more: no sweep
    >>> d.iterations, permask.Permutation(d.result().perms) == pi
    (0, True)
    """

    def __init__(
        self,
        params_a: Mapping[str, torch.Tensor],
        params_b: Mapping[str, torch.Tensor],
        graph: PermutationGraph,
        *,
        seed: int = 0,
        solver: str = "auto",
        init: Mapping[str, torch.Tensor] | None = None,
        only: Collection[str] | None = None,
        overlap: bool = True,
        keep_scores: bool | None = None,
    ) -> None:
        layouts = {n: lays for n, lays in graph.permuted_tensors.items() if n in graph.parameters}
        self._device = device = next(iter(params_b.values())).device
        self._layouts = layouts
        # the models' own tensors (their dtype: nothing copied); scores are float32 products
        self._wa = {n: params_a[n].detach().to(device) for n in layouts}
        self._wb = {n: params_b[n].detach().to(device) for n in layouts}
        self._terms = terms = _group_terms(graph, layouts, self._wb, device)
        self._affected: dict[str, list[tuple[str, int]]] = {}  # group -> the terms it changes
        for g, ss in terms.items():
            for i, s in enumerate(ss):
                for h in s.depends:
                    self._affected.setdefault(h, []).append((g, i))
        names = _input_to_output(graph, [g for g in terms if only is None or g in only])
        self._names = names
        self._sizes = {g.name: g.size for g in graph}
        self._joint = _joint_terms(layouts, self._sizes, self._wb, device, set(names))
        self.perms = {g.name: torch.arange(g.size, device=device) for g in graph}
        self.perms.update({g: p.to(device) for g, p in (init or {}).items()})
        self._seen: dict[tuple[str, int], list[torch.Tensor | None]] = {}  # last scored at
        self._totals: dict[str, torch.Tensor] = {}  # a group's scores: its terms' sum
        self._stale = {(g, i) for g in names for i in range(len(terms[g]))}
        # a joint move is re-tried when a group its tensors depend on changed since its last try
        self._joint_deps = {
            o: set().union(*(_groups_of(layouts[s.tensor]) for s in ss))
            for o, ss in self._joint.items()
        }
        self._joint_stale = set(self._joint)
        # groups whose estimates a group's scores (and its stale terms) depend on
        self._deps = {g: frozenset().union(*(s.depends for s in terms[g])) for g in names}
        self._pending: dict[str, Future] = {}  # LAPs solving in the background, in visiting order
        self._pool: ThreadPoolExecutor | None = None  # while settle() runs
        self._gen = torch.Generator().manual_seed(seed)
        self._guessed = frozenset(g for g in names if g not in (init or {}))  # identity starts
        self._solved: set[str] | None = None  # groups solved so far in the first sweep
        self.solver, self.overlap, self.iterations = solver, overlap, 0
        if keep_scores is None:  # a few cost matrices at a time beyond this (module docstring)
            keep_scores = 4 * sum(self._sizes[g] ** 2 for g in names) <= KEEP_SCORES_BYTES
        self.keep_scores = keep_scores

    def settle(self, max_iter: int = 100) -> None:
        """Sweep until no group can improve or ``max_iter`` sweeps in all have run."""
        with ThreadPoolExecutor(max_workers=1) as pool:
            self._pool = pool
            try:
                while (self._stale or self._joint_stale) and self.iterations < max_iter:
                    self.sweep()
            finally:
                self._pool = None

    def sweep(self) -> None:
        """Visit every optimised group once: input to output and layer-wise first, then in
        seeded random orders (module docstring); then take every pending LAP."""
        self.iterations += 1
        order = range(len(self._names))
        if self.iterations > 1:
            order = torch.randperm(len(self._names), generator=self._gen).tolist()
        self._solved = set() if self.iterations == 1 else None
        try:
            for i in order:
                self.visit(self._names[i])
        finally:
            self._solved = None
        self._collect()

    def _known(self, term: _ScoreTerm) -> bool:
        """Whether ``term`` enters its group's score now: always, except in the first sweep,
        where a term waits (stale) until every group on its tensor's other axes that started
        at the identity (optimised, not in ``init``) has been solved in that sweep (module
        docstring)."""
        if self._solved is None:
            return True
        return all(h in self._solved or h not in self._guessed for h in term.across)

    def visit(self, g: str) -> None:
        """Update ``g``'s running score and solve its LAP, every other group fixed (class
        docstring); no LAP when none of its contributions changed."""
        if not self.keep_scores and len(self._pending) > 1:  # two score matrices at most
            self._collect(list(self._pending)[:-1])
        self._collect(self._deps[g] | {g})  # its scores and staleness are now those of the sequence
        todo = [i for i, s in enumerate(self._terms[g]) if (g, i) in self._stale and self._known(s)]
        if todo and g not in self._totals:  # not kept since its last LAP: every term anew
            todo = [i for i, s in enumerate(self._terms[g]) if self._known(s)]
            for i in todo:
                self._seen.pop((g, i), None)
        for i in todo:
            s = self._terms[g][i]
            idxs = _indices(s, self._layouts, self.perms)
            if g not in self._totals:
                self._totals[g] = _contribution(s, self._wa, idxs)
            else:
                _accumulate(self._totals[g], s, self._wa, self._wb, idxs, self._seen.get((g, i)))
            self._seen[(g, i)] = idxs
            self._stale.discard((g, i))
        if todo:  # a GPU score is copied here, on the caller's CUDA stream
            total = self._totals[g]
            score = total if total.device.type == "cpu" else total.cpu()
            if self._pool is None:  # visited outside settle(): solved here
                self._pending[g] = done = Future()
                done.set_result(solve_lap(score, solver=self.solver))
            else:
                self._pending[g] = self._pool.submit(solve_lap, score, solver=self.solver)
            if not self.overlap or self._pool is None:
                self._collect()
            if self._solved is not None:
                self._solved.add(g)
        if g in self._joint:  # the sequence's estimates and joint_stale (g's own LAP may add g)
            self._collect()
            if g in self._joint_stale:
                self.joint_move(g)

    def joint_move(self, outer: str) -> list[str]:
        """Re-solve the blocks x within structure of ``outer`` jointly from its full
        ``(block, within)`` scores; keep it if the objective of the tensors it touches improves.
        Returns the groups that changed."""
        self._collect()
        self._joint_stale.discard(outer)
        scores: dict[tuple[str, ...], torch.Tensor] = {}
        for s in self._joint[outer]:
            c = _contribution(s, self._wa, _indices(s, self._layouts, self.perms)).T  # [n_a, n_b]
            scores[s.groups] = scores[s.groups] + c if s.groups in scores else c
        proposal = {
            g: p.to(self.perms[g].device)
            for g, p in assign(scores, self._sizes, self.solver).items()
        }
        changed = [g for g, p in proposal.items() if not torch.equal(p, self.perms[g])]
        if not changed:
            return []
        touched = {n for n, lays in self._layouts.items() if set(changed) & _groups_of(lays)}
        old = _objective(touched, self._wa, self._wb, self._layouts, self.perms)
        new = _objective(touched, self._wa, self._wb, self._layouts, {**self.perms, **proposal})
        if not _improves(new, old):
            return []
        self.perms.update(proposal)
        for h in changed:
            self._moved(h)
        return changed

    def scores(self, g: str) -> torch.Tensor:
        """``[n_a, n_b]`` weight-matching scores of group ``g`` at the current estimates of the
        other groups (on the CPU): what a visit of ``g`` would solve."""
        terms = self._terms.get(g, [])
        total = sum(
            _contribution(s, self._wa, _indices(s, self._layouts, self.perms)) for s in terms
        )
        return torch.as_tensor(total).T.cpu() if terms else torch.zeros(0)

    def result(self) -> WeightMatchResult:
        """Estimates (on the CPU), objective and sweeps so far."""
        objective = _objective(self._layouts, self._wa, self._wb, self._layouts, self.perms)
        perms = {g: p.cpu() for g, p in self.perms.items()}
        scored = self._totals if self.keep_scores else {g: None for g in self._names}
        sure = {
            g: margin(self.scores(g) if t is None else t.T, perms[g])
            for g, t in scored.items()
            if g in self._names and self._terms[g]
        }
        margins = {g: m for g, (m, _) in sure.items()}
        ties = {g: t for g, (_, t) in sure.items() if t}
        return WeightMatchResult(perms, objective, self.iterations, margins, ties)

    def _collect(self, among: Collection[str] | None = None) -> None:
        """Take the pending LAP results of ``among`` (all: None) as the sequential loop would:
        in visiting order, each kept if it improves its group's score."""
        for h in [h for h in self._pending if among is None or h in among]:
            p = self._pending.pop(h).result().to(self._device)
            score, ar = self._totals[h], torch.arange(len(p), device=self._device)
            new, old = score[ar, p].sum().item(), score[ar, self.perms[h]].sum().item()
            if _improves(new, old):
                self.perms[h] = p
                self._moved(h)
            if not self.keep_scores:
                del self._totals[h]

    def _moved(self, h: str) -> None:
        """``h``'s estimate changed: mark the scores and joint moves that depend on it."""
        self._stale.update(k for k in self._affected.get(h, ()) if k[0] in self._names)
        self._joint_stale.update(o for o, deps in self._joint_deps.items() if h in deps)


#: Weight matching keeps every group's running scores (updated in place as other groups move)
#: while they take at most this many bytes in all; beyond it, a group's scores live only from
#: its visit until its LAP is taken and are computed anew at its next visit.
KEEP_SCORES_BYTES = 1 << 30


def _input_to_output(graph: PermutationGraph, names: list[str]) -> list[str]:
    """``names`` sorted by the first use of their tensors in the forward (``graph.tensors`` is
    in that order), ties kept in the graph's order. A stream group named after a tensor late in
    the graph (a downsampling conv whose channels a later split cuts into parts) comes before
    the blocks that read it."""
    first = {t: i for i, t in enumerate(graph.tensors)}
    return sorted(names, key=lambda g: min(first[m.tensor] for m in graph[g].members))


def _group_terms(
    graph: PermutationGraph,
    layouts: dict[str, list[Layout]],
    wb: dict[str, torch.Tensor],
    device: torch.device,
) -> dict[str, list[_ScoreTerm]]:
    """Per group, a term for each of its member axes on a parameter, with the groups that its
    contribution depends on."""
    terms: dict[str, list[_ScoreTerm]] = {}
    for g in graph:
        for m in g.members:
            if m.tensor not in layouts:
                continue
            lays = layouts[m.tensor]
            across = set().union(*(layout_groups(x) for a, x in enumerate(lays) if a != m.axis))
            depends = across | (set(layout_groups(lays[m.axis])) - {g.name})
            rows = _rows(m.layout, g.name, g.size, device)
            terms.setdefault(g.name, []).append(
                _ScoreTerm(
                    (g.name,),
                    m.tensor,
                    m.axis,
                    rows,
                    wb[m.tensor],
                    frozenset(depends),
                    frozenset(across),
                )  # fmt: skip
            )
    return terms


def _joint_terms(
    layouts: dict[str, list[Layout]],
    sizes: dict[str, int],
    wb: dict[str, torch.Tensor],
    device: torch.device,
    names: set[str],
) -> dict[str, list[_ScoreTerm]]:
    """Per outermost group of a nesting (blocks x within, and deeper; all its groups optimised),
    the terms of every axis unit made of the nesting's groups."""

    def units(shared: bool) -> list:
        """Axis units; with ``shared``, only of axes where groups share positions."""
        return [
            (u, tensor, axis)
            for tensor, lays in layouts.items()
            for axis, lay in enumerate(lays)
            if not shared or len(layout_groups(lay)) > 1
            for u in axis_units(lay, sizes)
        ]

    nestings = _nestings([u.groups for u, _, _ in units(shared=True)])
    nestings = {root: family for root, family in nestings.items() if family <= names}
    joint: dict[str, list[_ScoreTerm]] = {}
    found = units(shared=False) if nestings else []
    for root, family in nestings.items():
        for u, tensor, axis in found:
            if set(u.groups) <= family:
                rows = u.index.T.to(device)
                joint.setdefault(root, []).append(
                    _ScoreTerm(u.groups, tensor, axis, rows, wb[tensor])
                )
    return joint


def _nestings(chains: list[tuple[str, ...]]) -> dict[str, set[str]]:
    """Outermost group -> every group nested under it (itself included), from the chains of
    groups that share positions; a group inside two groups spoils its whole nesting (none)."""
    parent, clashes = parents(chains)
    spoilt = {inner for inner, _, _ in clashes}
    families: dict[str, set[str]] = {}
    for g in set(parent) | set(parent.values()):
        top, seen = g, {g}
        while top in parent and parent[top] not in seen:
            top = parent[top]
            seen.add(top)
        families.setdefault(top, set()).add(g)
    return {r: f for r, f in families.items() if r not in parent and not f & spoilt}


def _improves(new: float, old: float) -> bool:
    """A move is kept only for a gain above float32 noise in the scores (1e-7 relative)."""
    return new > old + 1e-7 * max(abs(old), 1e-30)


def _groups_of(layouts: list[Layout]) -> set[str]:
    return {g for lay in layouts for g in layout_groups(lay)}


def _objective(
    names: Collection[str],
    wa: dict[str, torch.Tensor],
    wb: dict[str, torch.Tensor],
    layouts: dict[str, list[Layout]],
    perms: Mapping[str, torch.Tensor],
) -> float:
    """``sum <W_B, P W_A>`` over the named tensors, summed in float64."""
    total = 0.0
    for n in names:
        t = wa[n]
        idxs = [layout_index(lay, perms, t.device) if layout_groups(lay) else None
                for lay in layouts[n]]  # fmt: skip
        pieces = _pieces(t, wb[n], idxs, 0 if t.dim() else None)
        total += sum(float((a * b).sum(dtype=torch.float64)) for a, b in pieces)
    return total


def _indices(
    term: _ScoreTerm, layouts: dict[str, list[Layout]], perms: dict[str, torch.Tensor]
) -> list[torch.Tensor | None]:
    """Per axis of the term's tensor, A's index map at the current estimates (``None``: identity);
    on the term's own axis only the groups other than the term's move."""
    others = {k: v for k, v in perms.items() if k not in term.groups}
    out: list[torch.Tensor | None] = []
    for axis, lay in enumerate(layouts[term.tensor]):
        idx = layout_index(lay, others if axis == term.axis else perms, term.source.device)
        out.append(None if torch.equal(idx, torch.arange(len(idx), device=idx.device)) else idx)
    return out


#: Products over tensors larger than this (in float32) go piece by piece along one axis, so the
#: float32 copies they need stay this small (an embedding of 32000 x 2048: 250 MiB otherwise).
PIECE_BYTES = 64 << 20


def _piece(t: torch.Tensor, axis: int) -> int:
    """How many positions of ``axis`` one piece of ``t`` takes (:data:`PIECE_BYTES`)."""
    return max(1, PIECE_BYTES // max(1, 4 * t.numel() // max(1, t.shape[axis])))


def _pieces(
    a: torch.Tensor, b: torch.Tensor, idxs: list[torch.Tensor | None], axis: int | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A at ``idxs`` (every axis moved) and B, in float32, slice by slice along ``axis`` (whole
    when ``axis`` is ``None``)."""
    if axis is None:
        yield _f32(_take(a, idxs)), _f32(b)
        return
    step, n = _piece(a, axis), a.shape[axis]
    for start in range(0, n, step):
        k = min(step, n - start)
        rows = idxs[axis]
        pa = a.narrow(axis, start, k) if rows is None else a.index_select(axis, rows[start:][:k])
        yield _f32(_take(pa, idxs, skip=axis)), _f32(b.narrow(axis, start, k))


def _take(t: torch.Tensor, idxs: list[torch.Tensor | None], skip: int = -1) -> torch.Tensor:
    for axis, idx in enumerate(idxs):
        if idx is not None and axis != skip:
            t = t.index_select(axis, idx)
    return t


def _contribution(
    term: _ScoreTerm, wa: dict[str, torch.Tensor], idxs: list[torch.Tensor | None]
) -> torch.Tensor:
    """``[n_b, n_a]`` scores from one term with A's axes at ``idxs`` (B-major: the LAP reads it
    without a transposing copy)."""
    t = wa[term.tensor]
    axis = max((x for x in range(t.dim()) if x != term.axis), key=t.size, default=None)
    total = None
    for pa, pb in _pieces(t, term.source, idxs, axis):  # sums over slices of the other axes
        a, b = (_gather(x, term.axis, term.rows) for x in (pa, pb))
        with torch.autocast(a.device.type, enabled=False):  # float32 scores under AMP too
            total = b @ a.T if total is None else total.addmm_(b, a.T)
    return total


def _accumulate(
    total: torch.Tensor,
    term: _ScoreTerm,
    wa: dict[str, torch.Tensor],
    wb: dict[str, torch.Tensor],
    idxs: list[torch.Tensor | None],
    old: list[torch.Tensor | None] | None,
) -> None:
    """Add a term's contribution at ``idxs`` to ``total``, which holds it at ``old`` (``None``:
    not yet), in place.

    When one other axis moved, only its moved positions ``D`` are recomputed:
    ``total += B[D] (A[new[D]] - A[old[D]])^T``, a product ``|D| / n`` the size of the full one.
    Late sweeps of coordinate descent move a few elements at a time, so this is most updates,
    and no per-term scores need to be kept.
    """
    if old is None:
        total.add_(_contribution(term, wa, idxs))
        return
    moved = [a for a, (i, j) in enumerate(zip(idxs, old)) if not _same(i, j)]
    if not moved:  # its groups moved and came back
        return
    if len(moved) != 1 or moved[0] == term.axis:  # several axes, or a shared one: in full
        total.add_(_contribution(term, wa, idxs)).sub_(_contribution(term, wa, old))
        return
    axis = moved[0]
    n = wa[term.tensor].shape[axis]
    i_new, i_old = (
        torch.arange(n, device=total.device) if i is None else i for i in (idxs[axis], old[axis])
    )
    d = (i_new != i_old).nonzero().flatten()
    t = _take(wa[term.tensor].index_select(axis, torch.cat([i_new[d], i_old[d]])), idxs, skip=axis)
    t = _f32(t)
    diff = t.narrow(axis, 0, len(d)) - t.narrow(axis, len(d), len(d))
    b = (
        term.b
        if len(d) == n
        else _f32(_gather(wb[term.tensor].index_select(axis, d), term.axis, term.rows))
    )
    total.addmm_(b, _gather(diff, term.axis, term.rows).T)


def _same(i: torch.Tensor | None, j: torch.Tensor | None) -> bool:
    return i is j or (i is not None and j is not None and torch.equal(i, j))
