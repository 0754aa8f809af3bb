"""Activation matching on batches of other shapes than a ``torch.export`` graph was captured on.

An exported graph is specialised to its example inputs' shapes (its ``view``/``reshape`` sizes
and masks are literal numbers), so replaying it on a batch of 16 tokens when it was captured on
8 fails. Text comes in many lengths: for each new input shape, :class:`ShapeReplays` captures
model A again on that batch and builds another paired module feeding the *same* statistics.
This is sound only if every observation point is the same in the new graph (a node of the same
name, op and size on the observed axis); if not, a ``ValueError`` says which and what to do.
Each new shape costs one export (about 0.3-2 s for the tiny Hugging Face configs of
docs/coverage.md): pad or bucket batches to a few lengths.

>>> import torch, permask
>>> from permask.match.activation import CorrelationStats, paired_module
>>> from permask.match.points import plan_points
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> graph = permask.trace(net, {"input": torch.randn(3, 4)})  # dict inputs: torch.export
>>> stats = CorrelationStats(plan_points(graph), torch.device("cpu"))
>>> replays = ShapeReplays(net, net, graph, stats, paired_module(net, net, graph.fx_graph, stats))
>>> replays.module({"input": torch.randn(5, 4)}) is replays.module({"input": torch.randn(3, 4)})
False
>>> len(replays)  # the captured shape and one more
2
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from ..graph import PermutationGraph
from ..graph.capture import target_name
from ..graph.export import export_capture
from .activation import CorrelationStats, paired_module

__all__ = ["ShapeReplays"]

Signature = tuple[tuple[str, tuple[int, ...]], ...]


class ShapeReplays:
    """Paired modules of models A and B, one per input shape (module docstring).

    ``paired`` runs ``graph`` (captured by ``torch.export``) on inputs of the shapes it was
    captured on; :meth:`module` returns it for such inputs, and for others a paired module of a
    fresh capture on those inputs, kept for the next batch of that shape.
    """

    def __init__(
        self,
        model_a: nn.Module,
        model_b: nn.Module,
        graph: PermutationGraph,
        stats: CorrelationStats,
        paired: nn.Module,
    ) -> None:
        self._a, self._b, self._stats = model_a, model_b, stats
        inputs = [n for n in graph.fx_graph.nodes if n.op == "placeholder"]
        self._names = [str(n.target) for n in inputs]
        captured = tuple(
            (name, tuple(n.meta["val"].shape))
            for name, n in zip(self._names, inputs)
            if isinstance(n.meta.get("val"), torch.Tensor)
        )
        self._modules: dict[Signature | None, nn.Module] = {captured: paired, None: paired}
        self._points = {p.node: p for p in stats.plan.points}

    def __len__(self) -> int:
        return len({id(m) for m in self._modules.values()})

    def module(self, inputs: Any) -> nn.Module:
        """The paired module for ``inputs`` (a dict of keyword inputs or a tuple)."""
        sig = self._signature(inputs)
        if sig not in self._modules:
            self._modules[sig] = self._capture(inputs, sig)
        return self._modules[sig]

    def _signature(self, inputs: Any) -> Signature | None:
        """Shapes of the tensor inputs by placeholder name; None if they do not map onto the
        graph's inputs (then the captured module is used, and fails as it would)."""
        if isinstance(inputs, dict):
            named = inputs.items()
        else:
            named = zip(self._names, inputs)
        sig = tuple((k, tuple(v.shape)) for k, v in named if isinstance(v, torch.Tensor))
        return sig if all(k in self._names for k, _ in sig) else None

    def _capture(self, inputs: Any, sig: Signature) -> nn.Module:
        args, kwargs = ((), dict(inputs)) if isinstance(inputs, dict) else (tuple(inputs), {})
        gm, _ = export_capture(self._a, args, kwargs)
        _check_points(gm.graph, self._points, sig)
        return paired_module(self._a, self._b, gm.graph, self._stats)


def _check_points(graph: fx.Graph, points: dict, sig: Signature) -> None:
    """A ``ValueError`` unless every observed node is in ``graph`` with the same op and size on
    the observed axis (the statistics are shared with the first capture)."""
    nodes = {n.name: n for n in graph.nodes}
    for name, p in points.items():
        n = nodes.get(name)
        val = n.meta.get("val") if n is not None else None
        same = isinstance(val, torch.Tensor) and val.ndim > p.axis and val.shape[p.axis] == p.size
        if not same or p.target != target_name(n):
            shapes = ", ".join(f"{k} {list(s)}" for k, s in sig)
            raise ValueError(
                f"a batch of other input shapes ({shapes}) gives a different exported graph at "
                f"observation point '{name}' ({p.target}); pad or bucket the batches to the "
                "shapes the graph was traced on, or trace on a batch of each shape yourself"
            )
