"""Helpers to check that a permutation leaves a model's function unchanged.

Use them to test your own rules the way permask tests its own: float64, eval mode, random
permutations, and weights perturbed so that zero-initialised layers (layer scale, heads) and
BatchNorm statistics cannot hide a wrong permutation.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .graph import Permutation, PermutationGraph
from .permute import permute_model

__all__ = ["perturb_", "outputs", "equivalence_error"]


def perturb_(model: nn.Module, scale: float = 0.05, seed: int = 0) -> nn.Module:
    """Add noise to every parameter and draw random BatchNorm statistics, in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.running_var is not None:
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) * 1.5 + 0.5)
    return model


def outputs(model: nn.Module, x) -> torch.Tensor:
    """All outputs of ``model(x)`` (a tensor or a tuple of tensors) as one flat tensor."""
    with torch.no_grad():
        y = model(*x) if isinstance(x, tuple) else model(x)
    if isinstance(y, torch.Tensor):
        return y.flatten()
    return torch.cat([t.flatten() for t in y if isinstance(t, torch.Tensor)])


def equivalence_error(model: nn.Module, x, pi: Permutation, graph: PermutationGraph) -> float:
    """Max relative change of the outputs after permuting a copy of ``model`` by ``pi``."""
    y = outputs(model, x)
    y2 = outputs(permute_model(copy.deepcopy(model), pi, graph, inplace=True), x)
    return ((y - y2).abs().max() / y.abs().max().clamp_min(1e-30)).item()
