"""Check that permutations leave a model's function unchanged: :func:`check` in one call, and
the helpers it is made of.

Use them to test your own rules the way permask tests its own: float64, eval mode, random
permutations, and weights perturbed so that zero-initialised layers (layer scale, heads) and
BatchNorm statistics cannot hide a wrong permutation::

    result = permask.check(model, torch.randn(2, 3, 32, 32), rules={MyOp: my_rule})
    assert result.ok, result        # names the groups whose permutation changes the outputs
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .graph import Permutation, PermutationGraph, Rule, random_permutation, trace
from .permute import permute_model

__all__ = ["check", "CheckResult", "perturb_", "outputs", "equivalence_error"]


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


@dataclass
class CheckResult:
    """What :func:`check` found: the largest relative output change over the random
    permutations (``max_change``), the groups whose permutation alone changes the outputs by more
    than ``tol`` (``culprits``, with their changes), and the graph that was checked."""

    max_change: float
    culprits: dict[str, float]
    tol: float
    graph: PermutationGraph

    @property
    def ok(self) -> bool:
        return self.max_change <= self.tol

    def __str__(self) -> str:
        if self.ok:
            return f"ok: {len(self.graph)} groups, largest output change {self.max_change:.2e}"
        worst = ", ".join(f"{g} ({c:.1e})" for g, c in sorted(self.culprits.items())[:8])
        return (
            f"permutations change the outputs by up to {self.max_change:.2e} (> {self.tol:g}); "
            f"groups responsible: {worst or 'only in combination'}. A rule claims an op is "
            "unchanged by permutations it is not: check the rules of the ops these groups reach."
        )


def check(
    model: nn.Module,
    example_inputs: Any,
    *,
    rules: Mapping[Any, Rule] | None = None,
    trials: int = 3,
    tol: float = 1e-9,
    seed: int = 0,
) -> CheckResult:
    """Trace a float64, perturbed copy of ``model`` (with ``rules`` for this call, as
    :func:`permask.trace` takes them) and permute it randomly ``trials`` times; where the
    outputs move by more than ``tol`` (relative), permute each group alone to name the ones
    responsible. The model itself is not touched. A correct graph moves them by ~1e-15."""
    work = perturb_(copy.deepcopy(model).double().eval(), seed=seed)
    x = _double(example_inputs)
    graph = trace(work, x, rules=rules)
    gen = torch.Generator().manual_seed(seed)
    changes = [
        equivalence_error(work, x, random_permutation(graph, gen), graph) for _ in range(trials)
    ]
    culprits: dict[str, float] = {}
    if max(changes, default=0.0) > tol:
        for g in graph:
            alone = Permutation({g.name: _moving_permutation(g.size, gen)})
            change = equivalence_error(work, x, alone, graph)
            if change > tol:
                culprits[g.name] = change
    return CheckResult(max(changes, default=0.0), culprits, tol, graph)


def _moving_permutation(n: int, gen: torch.Generator) -> torch.Tensor:
    """A random permutation of ``n`` that moves something (for ``n > 1``)."""
    p = torch.randperm(n, generator=gen)
    return p.roll(1) if n > 1 and bool((p == torch.arange(n)).all()) else p


def _double(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.double() if x.is_floating_point() else x
    if isinstance(x, (tuple, list)):
        return tuple(_double(t) for t in x)
    return x
