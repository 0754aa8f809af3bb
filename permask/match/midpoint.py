"""The loss of the midpoint between two models: what the matchers that learn from the loss
(STE matching, learned orthogonal maps) minimise.

The midpoint runs on one model's structure with the averaged tensors put in by
:func:`torch.func.functional_call`; its choices, where the papers leave them open:

- the loss is cross entropy on ``(inputs, targets)`` batches, or the model's own ``loss`` for
  dict batches with ``labels`` (Hugging Face);
- dropout is off and BatchNorm runs on the batch's statistics (an average of two models has no
  running statistics of its own);
- buffers are the fixed model's; only parameters are averaged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from .._batches import split_batch, to_device

__all__ = ["midpoint_modes", "batch_loss"]


@contextlib.contextmanager
def midpoint_modes(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode (no dropout) with BatchNorm on the batch's statistics, its modes
    restored on exit."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
        yield
    finally:
        for m, training in modes.items():
            m.train(training)


def batch_loss(model: nn.Module, tensors: dict, batch, device) -> torch.Tensor:
    """The loss of ``model`` with ``tensors`` (by name) on one batch, moved to ``device``."""
    inputs, targets = split_batch(batch, need_targets=True)
    inputs, targets = to_device(inputs, device), targets.to(device)
    if isinstance(inputs, dict):
        return functional_call(model, tensors, (), {**inputs, "labels": targets}).loss
    out = functional_call(model, tensors, tuple(inputs))
    logits = out if isinstance(out, torch.Tensor) else out[0]
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten())
