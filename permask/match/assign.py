"""Turn A-vs-B score matrices into permutations of A's groups (plain or blocks x within).

Scores are ``[n_a, n_b]`` (rows: A's elements, columns: B's). The permutation ``p`` moves A onto
B: B's element ``i`` is matched with A's element ``p[i]`` (``new = old.index_select(axis, p)``).

A structured unit ``(outer, inner)`` (a grouped conv's or GroupNorm's blocks x within, one within
order shared by all blocks) is solved as in the design notes: the best within-block assignment for
every pair of blocks (summed over every inner group that shares these blocks) scores the pair;
blocks are assigned on those scores, then each inner group on its scores summed over the matched
block pairs. This is exact when B is a permutation of A and a good heuristic otherwise.
"""

from __future__ import annotations

import torch

from .lap import solve_lap

__all__ = ["assign"]


def _match(score: torch.Tensor, solver: str) -> torch.Tensor:
    """``p`` maximising ``sum_i score[p[i], i]``."""
    return solve_lap(score.T, maximize=True, solver=solver)


def assign(
    scores: dict[tuple[str, ...], torch.Tensor], sizes: dict[str, int], solver: str = "auto"
) -> dict[str, torch.Tensor]:
    """One permutation per group from per-unit scores (keys: ``(g,)`` or ``(outer, inner)``).

    A plain score of an outer group (positions where it appears without its inner groups) adds
    to the block-pair scores; one of an inner group adds to its final within-block problem.
    """
    plain: dict[str, torch.Tensor] = {}
    nested: dict[str, dict[str, torch.Tensor]] = {}
    for key, score in scores.items():
        score = score.detach().to("cpu", torch.float64)
        if len(key) == 1:
            plain[key[0]] = score
        else:
            outer, inner = key
            no, ni = sizes[outer], sizes[inner]
            nested.setdefault(outer, {})[inner] = score.reshape(no, ni, no, ni)
    perms: dict[str, torch.Tensor] = {}
    for outer, inners in nested.items():
        n = sizes[outer]
        pair = torch.zeros(n, n, dtype=torch.float64) + plain.pop(outer, 0)  # [block A, B]
        for t in inners.values():
            for ia in range(n):
                for ib in range(n):
                    s = t[ia, :, ib, :]
                    p = _match(s, solver)
                    pair[ia, ib] += s[p, torch.arange(len(p))].sum()
        p_outer = _match(pair, solver)
        perms[outer] = p_outer
        blocks_b = torch.arange(n)
        for inner, t in inners.items():
            within = t[p_outer, :, blocks_b, :].sum(0)
            perms[inner] = _match(within + plain.pop(inner, 0), solver)
    perms.update({g: _match(score, solver) for g, score in plain.items()})
    return perms
