"""Record the shape of every node's output by running the captured graph once.

``record_shapes(model, inputs)`` traces a copy of ``model`` and interprets the graph on the
example inputs, like ``torch.fx.passes.shape_prop``; it returns the copy, the graph module and
``{node: TensorMeta or concrete value}``. Meta tensors are used when every op supports them
(no parameter memory, no compute); models with ops that need real data (``.item()``, tensors
kept outside parameters and buffers) fall back to a real copy. Example inputs that do not fit
raise a :class:`TraceError` naming the node that failed::

    work, gm, metas = record_shapes(nn.Linear(3, 2), (torch.randn(1, 3),))
    [m for m in metas.values()][-1]          # TensorMeta((1, 2), torch.float32)
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_map

from .capture import fx_capture, target_name, unproxy
from .errors import InputMismatch, TraceError

__all__ = ["TensorMeta", "ShapeRecorder", "record_shapes"]


class TensorMeta:
    """Shape and dtype of a tensor seen while tracing (values are not kept)."""

    __slots__ = ("shape", "dtype")

    def __init__(self, t: torch.Tensor):
        self.shape = tuple(t.shape)
        self.dtype = t.dtype

    def __repr__(self) -> str:
        return f"TensorMeta({self.shape}, {self.dtype})"


class ShapeRecorder(fx.Interpreter):
    """Runs a graph module and keeps each node's output as :class:`TensorMeta` in ``metas``."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.extra_traceback = False  # our error names the node; fx's addition is noise
        self.metas: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as e:
            values = {node.name: v for node, v in self.metas.items()}
            raise InputMismatch(
                f"running node '{n.name}' ({n.op} {target_name(n)}) on the example inputs failed: "
                f"{type(e).__name__}: {unproxy(str(e), values)}. Check that example_inputs fit "
                "the model."
            ) from e
        self.metas[n] = tree_map(
            lambda v: TensorMeta(v) if isinstance(v, torch.Tensor) else v, result
        )
        return result


def record_shapes(model: nn.Module, inputs: tuple) -> tuple[nn.Module, fx.GraphModule, dict]:
    """Trace a copy of ``model`` in eval mode and record node shapes (see the module doc)."""
    for meta in (True, False):
        work = (_meta_copy(model) if meta else copy.deepcopy(model)).eval()
        gm = fx_capture(work, len(inputs))
        wanted = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        if len(inputs) > len(wanted) and not any(w.startswith("*") for w in wanted):
            raise InputMismatch(
                f"example_inputs has {len(inputs)} inputs but the model's forward takes "
                f"{len(wanted)} ({', '.join(wanted)}); pass one example per forward argument"
            )
        recorder = ShapeRecorder(gm)
        args = tree_map(_to_meta, inputs) if meta else inputs
        try:
            with torch.no_grad():
                recorder.run(*args)
        except TraceError:
            if meta:
                continue
            raise
        return work, gm, recorder.metas
    raise AssertionError("unreachable")


def _to_meta(x: Any) -> Any:
    return torch.empty_like(x, device="meta") if isinstance(x, torch.Tensor) else x


def _meta_copy(model: nn.Module) -> nn.Module:
    memo: dict[int, Any] = {}
    for t in [*model.parameters(), *model.buffers()]:
        m = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(m, t.requires_grad) if isinstance(t, nn.Parameter) else m
    return copy.deepcopy(model, memo)
