"""Shared checks: a permutation must leave a model's function unchanged (float64, eval)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

import permask
from permask.graph import PermutationGraph


def outputs(model: nn.Module, x) -> torch.Tensor:
    with torch.no_grad():
        y = model(*x) if isinstance(x, tuple) else model(x)
    return y if isinstance(y, torch.Tensor) else torch.cat([t.flatten() for t in y])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item()


def assert_equivariant(
    model: nn.Module, x, graph: PermutationGraph, seed: int, tol: float = 1e-6
) -> permask.Permutation:
    """Apply a random permutation and check outputs are unchanged; return the permutation."""
    pi = permask.random_permutation(graph, torch.Generator().manual_seed(seed))
    permuted = permask.permute_model(model, pi, graph)
    err = rel_err(outputs(model, x), outputs(permuted, x))
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
    torch.manual_seed(0)
    model = model.double().eval()
    # non-trivial BatchNorm statistics, so running stats matter for equivalence
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is not None:
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            if m.weight is not None:
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.5, 0.5)
    return model
