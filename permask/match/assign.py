"""Turn A-vs-B score matrices into permutations of A's groups, plain or nested (blocks x within).

Scores are ``[n_a, n_b]`` (rows: A's elements, columns: B's). The permutation ``p`` moves A onto
B: B's element ``i`` is matched with A's element ``p[i]`` (``new = old.index_select(axis, p)``).

A score's key is a *chain* of groups, outermost first: ``(g,)`` for one group, ``(outer,
inner)`` for a grouped conv's or GroupNorm's blocks x within, or longer where group structures
nest (a chain of grouped convs whose group counts change makes ``(2 x 2 x 8)`` channels, heads x
head_dim inside a block structure, ...); its elements are the row-major tuples of the chain's
groups. Every chain says which group sits directly inside which; together they form a forest
(each group inside at most one other), solved top down, exactly for the nesting:

1. a group's *pair value* for A's element ``a`` and B's element ``b`` is its plain scores at
   ``(a, b)`` plus, for each group directly inside it, the optimum of that group's own problem
   on the slice of the scores under ``(a, b)`` (recursively, with its own pair values);
2. the group is assigned on its pair values;
3. each group inside it then gets the scores summed over the matched pairs, plus the chains
   that start at it, and is solved the same way.

Step 1 scores a pair of blocks by the best within-block orders for that pair alone, which the
alternating single-group updates cannot see: they stall when a wrong block order is compensated
by wrong within orders. When B is a permutation of A every term is maximised by the true
permutation (Cauchy-Schwarz), so the planted permutation is recovered exactly. Cost: a group of
``n`` elements with a group of ``m`` inside costs ``n^2`` LAPs of size ``m`` (only their optimal
values: :func:`~permask.match.lap.optima`, one loop without per-call conversions) and one of size
``n``; a nesting of depth ``d`` multiplies the squares (``2 x 2 x 8``: 16 LAPs of 8, 4 of 2, 1
of 2).
"""

from __future__ import annotations

import torch

from .lap import optima, solve_lap

__all__ = [
    "OpenMargin",
    "assign",
    "column_gaps",
    "conditional",
    "margin",
    "nesting",
    "parents",
    "tangled",
]

Chain = tuple[str, ...]
Scores = list[tuple[Chain, torch.Tensor]]  # tensors [*A elements, *B elements] per chain


def _match(score: torch.Tensor, solver: str) -> torch.Tensor:
    """``p`` maximising ``sum_i score[p[i], i]`` (square ``score``), solved row by row (A's
    element for each of B's is the inverse). A contiguous float64 CPU score is negated in place
    for the minimising solver and restored (negation is exact), so an LLM's 5632 x 5632 group
    needs no copy; any other score is copied once."""
    if score.dtype != torch.float64 or score.device.type != "cpu" or not score.is_contiguous():
        return torch.argsort(solve_lap(score, maximize=True, solver=solver))
    score.neg_()
    try:
        return torch.argsort(solve_lap(score, maximize=False, solver=solver))
    finally:
        score.neg_()


def parents(chains: list[Chain]) -> tuple[dict[str, str], list[tuple[str, str, str]]]:
    """Inner group -> the group it sits directly inside (the first chain that says so wins),
    from chains (outermost first); and the clashes, ``(inner, that group, another)``, in the
    order met, where a group sits inside two different groups (not a forest)."""
    parent: dict[str, str] = {}
    clashes: list[tuple[str, str, str]] = []
    for chain in chains:
        for outer, inner in zip(chain, chain[1:]):
            if parent.setdefault(inner, outer) != outer:
                clashes.append((inner, parent[inner], outer))
    return parent, clashes


def nesting(chains: list[Chain]) -> dict[str, str]:
    """Inner group -> the group it sits directly inside, from chains (outermost first).

    A ``ValueError`` names a group that sits inside two different groups (not a forest)."""
    parent, clashes = parents(chains)
    if clashes:
        inner, first, other = clashes[0]
        raise ValueError(f"group '{inner}' sits inside two groups ('{first}' and '{other}')")
    return parent


def tangled(chains: list[Chain]) -> set[str]:
    """The groups of chains that do not form a forest: a group inside two different groups
    (CoaT's head-dim group under two parts of its split heads), and every group linked to it by
    a chain. :func:`nesting` of the other chains succeeds."""
    linked = {inner for inner, _, _ in parents(chains)[1]}
    grown = True
    while grown:
        grown = False
        for chain in chains:
            if set(chain) & linked and not set(chain) <= linked:
                linked.update(chain)
                grown = True
    return linked


def assign(
    scores: dict[Chain, torch.Tensor], sizes: dict[str, int], solver: str = "auto"
) -> dict[str, torch.Tensor]:
    """One permutation per group from per-chain scores (module docstring). Each score is
    ``[prod of the chain's sizes]`` square: A's element tuples by B's."""
    parent = nesting(list(scores))
    children: dict[str, list[str]] = {}
    for inner, outer in parent.items():
        children.setdefault(outer, []).append(inner)
    starting: dict[str, Scores] = {}  # per group, the chains that start at it
    for chain, score in scores.items():
        shape = [sizes[g] for g in chain] * 2
        t = score.detach().to("cpu", torch.float64).reshape(shape)
        starting.setdefault(chain[0], []).append((chain, t))
    perms: dict[str, torch.Tensor] = {}
    for root in [g for g in starting if g not in parent]:
        _solve(root, starting[root], starting, children, solver, perms)
    return perms


def _solve(
    g: str,
    tensors: Scores,
    starting: dict[str, Scores],
    children: dict[str, list[str]],
    solver: str,
    perms: dict[str, torch.Tensor],
) -> None:
    """Assign ``g`` on its pair values, then each group inside it on the collapsed scores."""
    p = _match(_pair_values(g, tensors, children), solver)
    perms[g] = p
    for c in children.get(g, []):
        inside = [_collapse(chain, t, p) for chain, t in tensors if chain[1:2] == (c,)]
        _solve(c, inside + starting.get(c, []), starting, children, solver, perms)


def _pair_values(g: str, tensors: Scores, children: dict[str, list[str]]):
    """``[n_a, n_b]``: plain scores of ``g`` plus, per group inside it, the optimum of its
    problem under each pair of ``g``'s elements (the one score itself, not a copy, when that is
    all there is: an LLM's MLP group is 5632 x 5632)."""
    if len(tensors) == 1 and len(tensors[0][0]) == 1 and not children.get(g):
        return tensors[0][1]
    n = next(t.shape[0] for _, t in tensors)
    value = torch.zeros(n, n, dtype=torch.float64)
    for chain, t in tensors:
        if len(chain) == 1:
            value += t
    for c in children.get(g, []):
        inside = _merged([(chain, t) for chain, t in tensors if chain[1:2] == (c,)])
        if not inside:
            continue
        if not children.get(c):  # c is innermost: one chain (g, c), LAPs on its blocks directly
            t = inside[0][1]  # [a, i, b, j] -> one [i, j] block per pair (a, b)
            blocks = t.permute(0, 2, 1, 3).reshape(n * n, *t.shape[1::2])
            value += torch.from_numpy(optima(blocks.numpy())).reshape(n, n)
            continue
        for a in range(n):
            for b in range(n):
                under = [(chain[1:], _slice(chain, t, a, b)) for chain, t in inside]
                v = _pair_values(c, under, children)
                value[a, b] += float(optima(v.numpy()[None])[0])
    return value


def _merged(tensors: Scores) -> Scores:
    """Tensors of the same chain summed: one per chain."""
    out: dict[Chain, torch.Tensor] = {}
    for chain, t in tensors:
        out[chain] = out[chain] + t if chain in out else t
    return list(out.items())


def _slice(chain: Chain, t: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """The scores under A's element ``a`` and B's element ``b`` of the chain's first group."""
    return t.select(len(chain), b).select(0, a)


def _collapse(chain: Chain, t: torch.Tensor, p: torch.Tensor) -> tuple[Chain, torch.Tensor]:
    """The chain without its first group, scores summed over the pairs ``(p[b], b)``."""
    k = len(chain)
    pairs = t.movedim(k, 1)[p, torch.arange(len(p))]  # [n, *A inner, *B inner]
    return chain[1:], pairs.sum(0)


def conditional(
    scores: dict[Chain, torch.Tensor], sizes: dict[str, int], perms: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Per group, its ``[n_a, n_b]`` scores with every other group of its chains held at
    ``perms``: the problem the group alone would solve, so :func:`margin` on it says whether its
    assignment is the unique optimum given the others (for a group inside a nesting, a
    certificate relative to the other groups' assignments, not a global one)."""
    out: dict[str, torch.Tensor] = {}
    for chain, score in scores.items():
        t = score.detach().to("cpu", torch.float64).reshape([sizes[g] for g in chain] * 2)
        n = len(chain)
        for k, g in enumerate(chain):
            rest = (*chain[:k], *chain[k + 1 :], g)
            u = t.movedim(k, n - 1).movedim(n + k, 2 * n - 1)  # g last on both sides
            while len(rest) > 1:  # the others summed over their pairs, outermost first
                rest, u = _collapse(rest, u, perms[rest[0]].cpu())
            out[g] = out[g] + u if g in out else u
    return out


def margin(score: torch.Tensor, p: torch.Tensor) -> tuple[float, int]:
    """How sure the assignment ``p`` of ``score`` (``[n_a, n_b]``) is.

    Returns the smallest margin, over B's elements, of the chosen A element's score over the
    best other A element's in that column, divided by the largest ``|score|``; and how many of
    B's elements have their chosen score tied with another (exactly equal). A positive margin
    certifies ``p`` as the unique optimum: every element's partner is its strict favourite, so
    any other assignment scores less. Zero or negative: the assignment trades elements off
    against each other (normal for unrelated models), or, with ties, is one of several equal.
    """
    s = score.detach()
    if s.shape[0] < 2:
        return torch.inf, 0
    return _margin(column_gaps(s, p), _scale(s))


def _scale(s: torch.Tensor) -> torch.Tensor:
    return s.abs().max().double().clamp_min(torch.finfo(torch.float64).tiny)


def _margin(gap: torch.Tensor, scale: torch.Tensor) -> tuple[float, int]:
    return float(gap.min().double() / scale), int((gap == 0).sum())


class OpenMargin:
    """What :func:`margin` needs of ``score`` (``[n_a, n_b]``, at least 2 rows) for an
    assignment that may still change only in the columns ``open``: those columns, the other
    columns' gaps at ``p`` and the scale, not the whole matrix (an LLM's MLP group: 5632 x 5632
    float64 kept while later passes run).

    >>> s = torch.tensor([[3.0, 0.0, 1.0], [1.0, 2.0, 0.0], [0.0, 1.0, 2.5]])
    >>> OpenMargin(s, torch.tensor([0, 1, 2]), torch.tensor([1, 2])).margin(torch.tensor([0, 2, 1]))
    (-0.8333333333333334, 0)
    >>> margin(s, torch.tensor([0, 2, 1]))
    (-0.8333333333333334, 0)
    """

    def __init__(self, score: torch.Tensor, p: torch.Tensor, open: torch.Tensor):
        s = score.detach()
        self.open = open.to(s.device)
        self.columns = s[:, self.open].clone()
        self.gaps = column_gaps(s, p)
        self.scale = _scale(s)

    def margin(self, p: torch.Tensor) -> tuple[float, int]:
        """:func:`margin` of the whole score at ``p``, which equals the ``p`` given when made
        outside the open columns."""
        gap = self.gaps.clone()
        gap[self.open] = column_gaps(self.columns, p.to(self.open.device)[self.open])
        return _margin(gap, self.scale)


def column_gaps(score: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Per B element (column of ``score``, ``[n_a, n_b]``, at least 2 rows), its chosen A
    element's score minus the best other A element's in that column."""
    cols = torch.arange(score.shape[1], device=score.device)
    p = p.to(score.device)
    top = score.topk(2, dim=0)  # the best other is the runner-up where the best is the chosen one
    best = torch.where(top.indices[0] == p, top.values[1], top.values[0])
    return score[p, cols] - best
