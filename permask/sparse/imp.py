"""Iterative magnitude pruning (IMP), with fine-tuning (the paper) or rewinding (Frankle et al.).

Rewind points count *completed* epochs: the checkpoint "at k" is the state after k full epochs
(k=0 is the initialization). The paper's released code saves its "epoch k" after k+1 epochs,
so its k=20 is k=21 here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .mask import Mask, NameFilter, apply_mask, mask_from_counts, n_keep, prunable_parameters
from .mask import sparsity as mask_sparsity

#: ``train_fn(model, mask, round)``: train ``model`` in place with ``mask`` fixed (round >= 1).
TrainFn = Callable[[nn.Module, Mask, int], None]


def imp_schedule(total: int, sparsity: float, rate: float = 0.2) -> list[int]:
    """Kept counts after each IMP round, by integer counts.

    Each round prunes ``max(1, round(rate * kept))`` of the ``kept`` remaining weights; the last
    round is clipped to exactly ``total - round(sparsity * total)``. E.g. 90% at rate 0.2 takes
    11 rounds. A round that would leave at most 1% of its own step to a further round goes to
    the target at once: a sparsity of ``1 - 0.8**2`` is 2 rounds, not a third retraining to prune
    the one weight that the per-round rounding left over.
    """
    if not 0.0 < rate < 1.0:
        raise ValueError(f"rate must be in (0, 1), got {rate}.")
    target = n_keep(total, sparsity)
    counts, kept = [], total
    while kept > target:
        step = max(1, round(rate * kept))
        kept = max(target, kept - step)
        if kept - target <= step // 100:  # a rounding tail, not a round
            kept = target
        counts.append(kept)
    return counts


@dataclass
class ImpResult:
    """Masks after each round (round r is ``masks[r - 1]``) and their overall sparsities."""

    masks: list[Mask]
    sparsities: list[float]


def imp(
    model: nn.Module,
    train_fn: TrainFn,
    sparsity: float,
    *,
    rate: float = 0.2,
    rewind_state: Mapping[str, torch.Tensor] | None = None,
    scope: str = "global",
    include: NameFilter | None = None,
    exclude: NameFilter | None = None,
    dense_shortcuts: bool = False,
) -> ImpResult:
    """Prune ``model`` (already trained dense) to exactly ``sparsity`` by IMP, in place.

    Each round removes ``rate`` of the remaining prunable weights by magnitude (``scope``
    "global", as the paper, or "layer"; kept counts from :func:`imp_schedule`, so the last round
    lands exactly on the target), zeroes them, then calls ``train_fn(model, mask, round)``:

    - fine-tuning (``rewind_state=None``, the paper): training continues from the current weights;
    - rewinding (Frankle et al.): the model is first reset to ``rewind_state`` (a
      ``model.state_dict()`` saved after k completed epochs) and masked. ``train_fn`` must then
      build a fresh optimizer (e.g. :class:`MaskedOptimizer`) and resume the schedule at k.

    ``train_fn`` must keep pruned weights at zero (use :class:`MaskedOptimizer`); the mask is
    re-applied after it anyway. Pruning itself is deterministic (ties broken by position), so the
    whole run is deterministic when ``train_fn`` is.
    """
    if scope not in ("global", "layer"):
        raise ValueError(f'scope must be "global" or "layer", got {scope!r}.')
    params = prunable_parameters(model, include, exclude, dense_shortcuts)
    if not params:
        raise ValueError("No prunable parameters selected; see magnitude_mask for include=.")
    # A copy, so that training cannot modify the rewind point through shared storage.
    rewind = None if rewind_state is None else copy.deepcopy(dict(rewind_state))
    sizes = {n: p.numel() for n, p in params.items()}
    if scope == "global":
        rounds: list[int | dict[str, int]] = list(imp_schedule(sum(sizes.values()), sparsity, rate))
    else:  # each tensor on its own schedule; those that reach their target early stay there
        per_layer = {n: [size, *imp_schedule(size, sparsity, rate)] for n, size in sizes.items()}
        n_rounds = max(len(s) - 1 for s in per_layer.values())
        rounds = [
            {n: s[min(r, len(s) - 1)] for n, s in per_layer.items()} for r in range(1, n_rounds + 1)
        ]
    if not rounds:
        raise ValueError(
            f"sparsity {sparsity} prunes no weight of the {sum(sizes.values())} selected "
            "(round(sparsity * n) = 0), so IMP would run no round and return no mask; ask for "
            "a higher sparsity."
        )
    mask: Mask | None = None
    result = ImpResult([], [])
    for r, keep in enumerate(rounds, start=1):
        mask = mask_from_counts(params, keep, mask)
        if rewind is not None:
            model.load_state_dict(rewind)
        apply_mask(model, mask)
        train_fn(model, mask, r)
        apply_mask(model, mask)
        result.masks.append({n: m.clone() for n, m in mask.items()})
        result.sparsities.append(mask_sparsity(mask).overall)
    return result
