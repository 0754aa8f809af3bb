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
from .errors import TraceError
from .graph import PermutationGraph, describe_op
from .registry import Rule, scoped_rules
from .rules import load_timm_rules
from .shapes import record_shapes
from .walk import Walker

__all__ = ["trace", "TraceError"]


def trace(
    model: nn.Module, example_inputs: Any, *, rules: Mapping[Any, Rule] | None = None
) -> PermutationGraph:
    """Trace ``model`` into a :class:`PermutationGraph`.

    ``example_inputs`` is a tensor or a tuple of tensors for ``model.forward``; shapes only
    matter (small inputs are fine). Tracing runs on a deep copy in eval mode on the model's
    device, so the model's parameters, buffers, modes and caches are left exactly as they were.
    DDP/DataParallel/``torch.compile`` wrappers are looked through (names are the inner module's).

    ``rules`` (``{module class, function or method name: rule}``) apply to this call only, before
    the registered ones: a way to try a rule without registering it for everyone. Any failure
    to trace raises :class:`TraceError`.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"trace needs an nn.Module, got a {type(model).__name__}")
    load_timm_rules()
    model = unwrap(model)
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    with scoped_rules(rules or {}):
        work, gm, metas = record_shapes(model, tuple(inputs))
        walker = Walker(work, gm, metas)
        walker.run()
        tensors = [*work.named_parameters(), *work.named_buffers()]
        graph = assemble(walker, work, {name: tuple(t.shape) for name, t in tensors})
    _warn_unruled(graph)
    return graph


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
