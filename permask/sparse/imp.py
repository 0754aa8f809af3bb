"""Iterative magnitude pruning (IMP), with fine-tuning (the paper) or rewinding (Frankle et al.).

One run can land exactly on several sparsities (``imp(model, train_fn, [0.9, 0.97])``): the round
that would pass a requested sparsity is clipped to it, so each one is the mask of some round.
``permask run`` calls this same function, with ``on_round`` saving and evaluating each target.

Rewind points count *completed* epochs: the checkpoint "at k" is the state after k full epochs
(k=0 is the initialization). The paper's released code saves its "epoch k" after k+1 epochs,
so its k=20 is k=21 here.

Example::

    result = imp(model, train_fn, [0.5, 0.9])   # train_fn(model, mask, round) trains in place
    result.mask_at(0.9)                          # the mask of the round that landed on 90%
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .mask import (
    Mask,
    NameFilter,
    apply_mask,
    mask_from_counts,
    n_keep,
    prunable_parameters,
    warn_layer_collapse,
)
from .mask import sparsity as mask_sparsity

__all__ = ["ImpResult", "ImpRound", "imp", "imp_schedule", "imp_sparsities"]

#: ``train_fn(model, mask, round)``: train ``model`` in place with ``mask`` fixed (round >= 1).
TrainFn = Callable[[nn.Module, Mask, int], None]


def imp_sparsities(targets: float | Iterable[float], rate: float = 0.2) -> list[float]:
    """Overall sparsity after each round, passing exactly through every target.

    Round r prunes ``rate`` of what survived round r - 1, clipped at the next target: e.g.
    targets (0.5,) at rate 0.2 give 0.2, 0.36, 0.488, 0.5.
    """
    if not 0.0 < rate < 1.0:
        raise ValueError(f"rate must be in (0, 1), got {rate}.")
    out: list[float] = []
    s = 0.0
    for target in sorted({targets} if isinstance(targets, (int, float)) else set(targets)):
        while s < target:
            s = min(target, 1.0 - (1.0 - s) * (1.0 - rate))
            out.append(s)
    return out


def _rounds(
    sizes: Mapping[str, int], targets: float | Iterable[float], rate: float, scope: str
) -> list[tuple[int | dict[str, int], tuple[float, ...]]]:
    """Kept counts of each round (in total, or per tensor for ``scope="layer"``) and the
    requested sparsities it lands on; a round that would prune nothing is no round."""
    wanted = {targets} if isinstance(targets, (int, float)) else set(targets)
    total = sum(sizes.values())
    prev: int | dict[str, int] = total if scope == "global" else dict(sizes)
    out: list[tuple[int | dict[str, int], tuple[float, ...]]] = []
    for s in imp_sparsities(wanted, rate):
        by_tensor = {n: n_keep(size, s) for n, size in sizes.items()}
        keep = n_keep(total, s) if scope == "global" else by_tensor
        reached = (s,) if s in wanted else ()
        if keep == prev:  # per-round rounding already got here (e.g. 1 - 0.8**2 from 0.8 * 0.8)
            if out:
                out[-1] = (out[-1][0], out[-1][1] + reached)
            continue
        out.append((keep, reached))
        prev = keep
    return out


def imp_schedule(total: int, sparsity: float | Iterable[float], rate: float = 0.2) -> list[int]:
    """Kept counts after each IMP round: ``n_keep(total, s)`` for each ``s`` of
    :func:`imp_sparsities`, rounds that would prune nothing left out. E.g. 90% at rate 0.2 takes
    11 rounds; ``1 - 0.8**2`` takes 2 (the float 0.8 * 0.8 lands on the target's count)."""
    return [keep for keep, _ in _rounds({"": total}, sparsity, rate, "global")]  # type: ignore[misc]


@dataclass
class ImpRound:
    """One finished round: ``round`` of ``rounds`` (from 1), its ``mask``, the mask's overall
    ``sparsity``, and the requested sparsities (``targets``) this mask is (often none)."""

    round: int
    rounds: int
    mask: Mask
    sparsity: float
    targets: tuple[float, ...]


@dataclass
class ImpResult:
    """Masks after each round (round r is ``masks[r - 1]``), their overall sparsities, and the
    round that landed on each requested sparsity (``rounds_of``; see :meth:`mask_at`)."""

    masks: list[Mask]
    sparsities: list[float]
    rounds_of: dict[float, int] = field(default_factory=dict)

    def mask_at(self, target: float) -> Mask:
        """The mask of the round that landed exactly on the requested sparsity ``target``."""
        if target not in self.rounds_of:
            raise KeyError(f"{target} was not requested; requested: {sorted(self.rounds_of)}")
        return self.masks[self.rounds_of[target] - 1]


def imp(
    model: nn.Module,
    train_fn: TrainFn,
    sparsity: float | Iterable[float],
    *,
    rate: float = 0.2,
    rewind_state: Mapping[str, torch.Tensor] | None = None,
    scope: str = "global",
    include: NameFilter | None = None,
    exclude: NameFilter | None = None,
    dense_shortcuts: bool = False,
    on_round: Callable[[ImpRound], None] | None = None,
) -> ImpResult:
    """Prune ``model`` (already trained dense) to exactly ``sparsity`` by IMP, in place.

    ``sparsity`` is one target or several (each lands exactly on some round). Each round removes
    ``rate`` of the remaining prunable weights by magnitude (``scope`` "global", as the paper, or
    "layer"; kept counts from :func:`imp_schedule`), zeroes them, then calls
    ``train_fn(model, mask, round)``:

    - fine-tuning (``rewind_state=None``, the paper): training continues from the current weights;
    - rewinding (Frankle et al.): the model is first reset to ``rewind_state`` (a
      ``model.state_dict()`` saved after k completed epochs) and masked. ``train_fn`` must then
      build a fresh optimizer (e.g. :class:`MaskedOptimizer`) and resume the schedule at k.

    ``train_fn`` must keep pruned weights at zero (use :class:`MaskedOptimizer`); the mask is
    re-applied after it anyway. ``on_round`` is called with an :class:`ImpRound` after each round
    (the model then holds that round's trained weights): save, evaluate or log there. Pruning
    is deterministic (ties broken by position), so the run is deterministic when ``train_fn`` is.
    """
    if scope not in ("global", "layer"):
        raise ValueError(f'scope must be "global" or "layer", got {scope!r}.')
    params = prunable_parameters(model, include, exclude, dense_shortcuts)
    if not params:
        raise ValueError("No prunable parameters selected; see magnitude_mask for include=.")
    # A copy, so that training cannot modify the rewind point through shared storage.
    rewind = None if rewind_state is None else copy.deepcopy(dict(rewind_state))
    sizes = {n: p.numel() for n, p in params.items()}
    rounds = _rounds(sizes, sparsity, rate, scope)
    if not rounds:
        raise ValueError(
            f"sparsity {sparsity} prunes no weight of the {sum(sizes.values())} selected "
            "(round(sparsity * n) = 0), so IMP would run no round and return no mask; ask for "
            "a higher sparsity."
        )
    mask: Mask | None = None
    result = ImpResult([], [])
    for r, (keep, reached) in enumerate(rounds, start=1):
        mask = mask_from_counts(params, keep, mask)
        warn_layer_collapse(mask, stacklevel=2)
        if rewind is not None:
            model.load_state_dict(rewind)
        apply_mask(model, mask)
        train_fn(model, mask, r)
        apply_mask(model, mask)
        result.masks.append(mask)
        result.sparsities.append(mask_sparsity(mask).overall)
        result.rounds_of.update(dict.fromkeys(reached, r))
        if on_round is not None:
            on_round(ImpRound(r, len(rounds), mask, result.sparsities[-1], reached))
    return result
