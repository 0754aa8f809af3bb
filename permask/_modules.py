"""Small helpers about ``nn.Module`` s, one definition for every package (depends on torch only)."""

from __future__ import annotations

import itertools

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP/DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (else buffer); CPU for a model with neither."""
    t = next(itertools.chain(model.parameters(), model.buffers()), None)
    return t.device if t is not None else torch.device("cpu")
