"""``permask.trace``: a model's permutation groups, as a :class:`PermutationGraph`.

The jobs, one module each:

1. :mod:`~permask.graph.capture`: torch.fx captures a copy of the model (timm's leaf modules,
   every module class with a rule as a leaf);
2. :mod:`~permask.graph.shapes`: one interpreted forward pass on the example inputs records every
   node's output shape (on meta tensors when possible);
3. :mod:`~permask.graph.walk`: each node's rule (:mod:`~permask.graph.registry`, through a
   :class:`~permask.graph.context.RuleContext`) relates the axes of its inputs, outputs and
   parameters in a union-find (:mod:`~permask.graph.unify`); unknown ops freeze what they touch;
4. :mod:`~permask.graph.assemble`: the result becomes groups, members, observation points and
   frozen axes.

Example::

    graph = permask.trace(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
    print(graph)                      # groups, their sizes, frozen axes with reasons
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch.nn as nn

from .._modules import unwrap
from .assemble import assemble
from .errors import InputMismatch, TraceError
from .export import export_capture
from .graph import PermutationGraph, describe_op
from .registry import Rule, scoped_rules
from .rules import load_timm_rules
from .shapes import record_shapes
from .walk import Walker

__all__ = ["trace", "TraceError", "FRONTENDS"]


FRONTENDS = ("auto", "fx", "export")


def trace(
    model: nn.Module,
    example_inputs: Any,
    *,
    rules: Mapping[Any, Rule] | None = None,
    frontend: str = "auto",
) -> PermutationGraph:
    """Trace ``model`` into a :class:`PermutationGraph`.

    ``example_inputs`` is a tensor, a tuple of tensors for ``model.forward``, or a dict of
    keyword inputs (``{"input_ids": ids}``); shapes only matter (small inputs are fine).
    Tracing runs on a deep copy in eval mode on the model's device, so the model's parameters,
    buffers, modes and caches are left exactly as they were. DDP/DataParallel/``torch.compile``
    wrappers are looked through (names are the inner module's).

    ``frontend``: ``"fx"`` captures by symbolic tracing (modules and torch functions),
    ``"export"`` by ``torch.export`` (ATen operators; models that symbolic tracing cannot reach),
    ``"auto"`` tries fx first and falls back to export (dict inputs go to export directly);
    ``graph.frontend`` and ``print(graph)`` say which one was used.

    ``rules`` (``{module class, function or method name: rule}``) apply to this call only, before
    the registered ones: a way to try a rule without registering it for everyone. Any failure
    to trace raises :class:`TraceError`.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"trace needs an nn.Module, got a {type(model).__name__}")
    if frontend not in FRONTENDS:
        raise ValueError(f"unknown frontend {frontend!r}; choose one of {', '.join(FRONTENDS)}")
    load_timm_rules()
    model = unwrap(model)
    args, kwargs = _split_inputs(example_inputs)
    with scoped_rules(rules or {}):
        used, work, gm, metas = _capture(model, args, kwargs, frontend)
        unsaved = frozenset(n for n, _ in model.named_buffers()) - set(model.state_dict())
        walker = Walker(work, gm, metas, unsaved)
        walker.run()
        tensors = [*work.named_parameters(), *work.named_buffers()]
        graph = assemble(walker, work, {name: tuple(t.shape) for name, t in tensors}, used)
    _warn_unruled(graph)
    return graph


def _split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def _capture(model: nn.Module, args: tuple, kwargs: dict, frontend: str) -> tuple:
    """(front end used, module whose tensors the graph names, graph module, node metas)."""
    fx_error = None
    if frontend == "fx" or (frontend == "auto" and not kwargs):
        if kwargs:
            raise TraceError("keyword example inputs need frontend='export' (or 'auto')")
        try:
            work, gm, metas = record_shapes(model, args)
            return "fx", work, gm, metas
        except TraceError as e:
            if frontend == "fx" or isinstance(e, InputMismatch):
                raise
            fx_error = e
    try:
        gm, metas = export_capture(model, args, kwargs)
    except TraceError as e:
        if fx_error is None:
            raise
        raise TraceError(f"{fx_error} Falling back to torch.export failed too: {e}") from e
    return "export", gm, gm, metas


def _warn_unruled(graph: PermutationGraph) -> None:
    """One warning naming the ops that froze axes for want of a rule (the fix is a rule)."""
    unruled = graph.unruled_ops
    if unruled:
        names = "; ".join(describe_op(r) for r in unruled[:3])
        more = f" and {len(unruled) - 3} more" if len(unruled) > 3 else ""
        warnings.warn(
            f"permask.trace: {len(unruled)} op(s) without a working rule froze the axes they "
            f"touch: {names}{more} (print(graph) lists them). Those channels will not be "
            "permuted; if they should be, add a rule (docs/graph.md, 'Adding a rule').",
            stacklevel=3,
        )
