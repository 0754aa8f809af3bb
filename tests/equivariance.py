"""Shared checks: a permutation must leave a model's function unchanged (float64, eval)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

import permask
from permask.graph import PermutationGraph
from permask.testing import equivalence_error, outputs, perturb_

__all__ = ["assert_equivariant", "break_one_member", "double_eval", "outputs", "rel_err"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item()


def assert_equivariant(
    model: nn.Module, x, graph: PermutationGraph, seed: int, tol: float = 1e-6
) -> permask.Permutation:
    """Apply a random permutation and check outputs are unchanged; return the permutation."""
    pi = permask.random_permutation(graph, torch.Generator().manual_seed(seed))
    err = equivalence_error(model, x, pi, graph)
    assert err <= tol, f"outputs changed by a valid permutation: max rel err {err:.3e}"
    return pi


def break_one_member(model: nn.Module, pi, graph: PermutationGraph) -> nn.Module:
    """Negative control: permute the widest-reaching group except in its first weight matrix."""
    group = max(graph, key=lambda g: (len(g.tensors), g.size))
    skip = next(t for t in group.tensors if len(graph.shapes[t]) >= 2)
    state = model.state_dict()
    only = permask.Permutation({group.name: pi[group.name]})
    new = permask.permute_tensors({n: t for n, t in state.items() if n != skip}, only, graph)
    broken = copy.deepcopy(model)
    broken.load_state_dict({**state, **new})
    return broken


def double_eval(model: nn.Module) -> nn.Module:
    """float64, eval mode, perturbed weights and random BatchNorm statistics."""
    torch.manual_seed(0)
    return perturb_(model.double().eval())
