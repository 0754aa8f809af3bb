"""IMP that lands exactly on several requested sparsities in one pass.

:func:`permask.sparse.imp` lands exactly on one target; the pipeline wants masks at, e.g., 90% and
97% from one run. Here each round prunes ``rate`` of the remaining weights (global magnitude),
except that a round which would pass a requested sparsity is clipped to land exactly on it, so
every requested sparsity is the mask of some round (no "closest round" approximation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from permask.sparse import Mask, apply_mask, magnitude_mask

__all__ = ["imp_rounds", "imp_sparsities"]


def imp_sparsities(targets: Iterable[float], rate: float = 0.2) -> list[float]:
    """Overall sparsity after each round, passing exactly through every target.

    E.g. targets (0.5,) at rate 0.2: 0.2, 0.36, 0.488, 0.5.
    """
    out: list[float] = []
    s = 0.0
    for target in sorted(set(targets)):
        while s < target:
            s = min(target, 1.0 - (1.0 - s) * (1.0 - rate))
            out.append(s)
    return out


def imp_rounds(
    model: nn.Module,
    sparsities: list[float],
    train_fn: Callable[[nn.Module, Mask, int], None],
    *,
    rewind_state: Mapping[str, torch.Tensor] | None = None,
    dense_shortcuts: bool = False,
) -> Iterator[tuple[int, float, Mask]]:
    """Prune ``model`` in place round by round; yield ``(round, sparsity, mask)`` after each.

    Each round ranks the surviving prunable weights globally by magnitude, prunes to the round's
    sparsity, then (rewinding variant, ``rewind_state`` given) resets the weights to the rewind
    point, zeroes the pruned ones and calls ``train_fn(model, mask, round)``, which must keep
    pruned weights at zero (train with the mask, i.e. :class:`permask.sparse.MaskedOptimizer`).
    """
    mask: Mask | None = None
    for r, s in enumerate(sparsities, start=1):
        mask = magnitude_mask(model, s, dense_shortcuts=dense_shortcuts, mask=mask)
        if rewind_state is not None:
            model.load_state_dict(rewind_state)
        apply_mask(model, mask)
        train_fn(model, mask, r)
        apply_mask(model, mask)
        yield r, s, mask
