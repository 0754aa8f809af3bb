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


def named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` by name."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def write_tensors(model: nn.Module, new: dict[str, torch.Tensor]) -> None:
    """Copy each tensor of ``new`` into ``model``'s parameter or buffer of that name (the
    tensor objects are kept, so optimizers holding them stay valid), then drop what modules
    derived from their parameters and cached in eval mode.

    timm's LeViT, EfficientFormer and EfficientViT cache attention biases in eval mode and
    clear the cache in ``train()``; a round trip through train mode, then restoring every
    module's own flag, clears such caches without changing any mode.
    """
    named = named_tensors(model)
    with torch.no_grad():
        for name, t in new.items():
            named[name].copy_(t)
    modes = [(m, m.training) for m in model.modules()]
    model.train(True)
    for m, training in modes:
        m.training = training


def check_same_architecture(model_a: nn.Module, model_b: nn.Module) -> None:
    """Raise ``ValueError`` naming the first tensor whose name or shape differs between the two
    models' state dicts (wrappers such as DDP are looked through)."""
    sd_a, sd_b = unwrap(model_a).state_dict(), unwrap(model_b).state_dict()
    for name, ta in sd_a.items():
        tb = sd_b.get(name)
        if tb is None:
            raise ValueError(f"model_b has no '{name}' (model_a: shape {tuple(ta.shape)})")
        if ta.shape != tb.shape:
            raise ValueError(
                f"models differ: {name} has shape {tuple(ta.shape)} in model_a and "
                f"{tuple(tb.shape)} in model_b; both must be the same architecture"
            )
    extra = [n for n in sd_b if n not in sd_a]
    if extra:
        shape = tuple(sd_b[extra[0]].shape)
        raise ValueError(f"model_a has no '{extra[0]}' (model_b: shape {shape})")


def usable_device(device: torch.device | str, caller: str) -> torch.device:
    """``device`` as a ``torch.device``, refused before any work when this machine or build
    cannot use it (``caller`` names the function in the message). MPS is refused too: it has no
    float64, which alignment and the metrics accumulate in."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"{caller}: device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"{caller}: device {str(device)!r}, but this torch build or machine has no CUDA; "
            "pass device='cpu'"
        )
    if dev.type == "mps":
        raise ValueError(
            f"{caller} cannot work on MPS: it has no float64, which the correlation statistics, "
            "the weight-matching objective and the metrics accumulate in; pass device='cpu' "
            "(models elsewhere are copied there, not moved)"
        )
    return dev
