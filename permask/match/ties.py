"""Pairs the data cannot order (constant or tied elements): found (:func:`unordered`),
re-matched by the weights (:func:`order_by_weights`), and the warnings that name them."""

from __future__ import annotations

import logging

import torch

from .activation import group_live
from .assign import column_gaps, conditional
from .lap import solve_lap
from .weight import weight_scores

__all__ = ["open_columns", "order_by_weights", "unordered", "warn_constant", "warn_ties"]

log = logging.getLogger(__name__)


def unordered(corr, live, perms, sizes: dict[str, int]) -> dict[str, tuple]:
    """Per group with pairs the data cannot order, ``(A's live flags, B's live flags, B's tied
    flags)``: pairs with a constant element (on either side), and *tied* pairs, whose
    correlation is within 1e-5 (relative) of the best other in its column (units that fire on
    the same one or two samples correlate alike with each other's partners). Every group on its
    scores with the other groups at their assignments
    (:func:`~permask.match.assign.conditional`): inside blocks x within, a block is constant
    when all its elements are, a within element when it is in every block
    (:func:`~permask.match.activation.group_live`)."""
    cond = conditional(corr, sizes, perms)
    flags = group_live(live, sizes)
    tied = {g: _tied(s, perms[g]) for g, s in cond.items()}
    return {g: (la, lb, tied[g]) for g, (la, lb) in flags.items()
            if not (la.all() and lb.all() and not tied[g].any())}  # fmt: skip


def order_by_weights(perms, todo: dict[str, tuple], params_a, params_b, graph, solver: str):
    """The pairs :func:`unordered` found, re-matched among themselves by weight matching's
    scores (every other group at its assignment, re-matched ones included: repeated until none
    changes, at most ``_ROUNDS`` times): the weights do order them. Other pairs of two
    live elements are the data's choice: kept, and none is formed anew (a tied pair may be
    re-formed with another tied one)."""
    out = dict(perms)
    for _ in range(_ROUNDS if todo else 0):  # each group's scores hold the others' re-matches
        scores = weight_scores(params_a, params_b, graph, out, list(todo))
        before = dict(out)
        for g, (la, lb, free) in todo.items():
            p = perms[g].cpu()
            pairs = open_columns(todo[g], p)
            sub = scores[g][p[pairs]][:, pairs].double()  # [A's of those pairs, B's]
            both_live = la[p[pairs]][:, None] & lb[pairs][None, :]
            both_live &= ~(free[pairs][:, None] & free[pairs][None, :])
            sub[both_live] = sub.min() - 1 - len(pairs) * (sub.max() - sub.min())
            out[g] = p.clone()
            out[g][pairs] = p[pairs][solve_lap(sub.T, maximize=True, solver=solver)]
        if all(torch.equal(out[g], before[g].cpu()) for g in todo):
            break
    return out


def open_columns(flags: tuple, p: torch.Tensor) -> torch.Tensor:
    """B's elements whose pair the data cannot order (a group's :func:`unordered` flags at its
    assignment ``p``): the only ones :func:`order_by_weights` may re-match."""
    la, lb, free = flags
    return (~lb | ~la[p.cpu()] | free).nonzero().flatten()


_ROUNDS = 5  # re-matches of groups whose weights meet (a dead unit feeding another's input)


def _tied(score: torch.Tensor, p: torch.Tensor, rtol: float = 1e-5) -> torch.Tensor:
    """Per B element, whether its chosen score is within ``rtol`` (of the largest |score|) of
    the best other A element's in its column, on the CPU."""
    s = score.detach()
    if s.shape[0] < 2:
        return torch.zeros(s.shape[1], dtype=torch.bool)
    return (column_gaps(s, p).abs() <= rtol * s.abs().max()).cpu()


def warn_ties(ties: dict[str, int], constant: dict[str, tuple[int, int]]) -> None:
    """One warning naming the groups whose scores tie elements for reasons other than
    constant channels (those have their own warning)."""
    explained = {g for unit in constant for g in unit.split(" x ")}
    tied = {g: n for g, n in ties.items() if g not in explained}
    if tied:
        worst = max(tied, key=tied.get)
        log.warning(
            "%d group(s) have elements whose best partners tie, so the assignment is one of "
            "several equally good (e.g. '%s': %d elements); AlignInfo.margins and .ties list "
            "them: weights that are equal (e.g. zero-initialised layers) cannot be told apart",
            len(tied), worst, tied[worst],
        )  # fmt: skip


def warn_constant(constant: dict[str, tuple[int, int]]) -> None:
    worst = max(constant, key=lambda k: max(constant[k]))
    log.warning(
        "activation matching: %d unit(s) have channels that were constant on the data, "
        "ordered by their weights instead (e.g. '%s': %d in model_a, %d in model_b); more or "
        "other data orders them by activations (AlignInfo.constant lists them)",
        len(constant), worst, *constant[worst],
    )  # fmt: skip
