"""Save and load masks as safetensors files (bool tensors, one entry per parameter name)."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from safetensors.torch import load_file, save_file

from .mask import Mask


def save_mask(mask: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write ``mask`` to ``path`` (safetensors, dtype bool, on CPU)."""
    for name, m in mask.items():
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            raise TypeError(f"Mask entry {name!r} must be a bool tensor; convert it with .bool().")
    # own copies: safetensors refuses entries that share memory (one tensor under two names)
    save_file({n: m.detach().cpu().clone() for n, m in mask.items()}, os.fspath(path))


def load_mask(path: str | os.PathLike, device: str | torch.device = "cpu") -> Mask:
    """Read a mask written by :func:`save_mask` (0/1 uint8 files are accepted and converted)."""
    loaded = load_file(os.fspath(path), device=str(device))
    mask = {}
    for name, m in loaded.items():
        if m.dtype != torch.bool:
            if m.is_floating_point() or not bool(((m == 0) | (m == 1)).all()):
                raise ValueError(
                    f"Entry {name!r} of {os.fspath(path)!r} is not a mask: dtype {m.dtype}, "
                    "expected bool or 0/1 integers."
                )
            m = m.bool()
        mask[name] = m
    return mask
