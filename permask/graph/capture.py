"""Capture a model's forward as a torch.fx graph (the fx front end of :func:`permask.trace`).

``fx_capture(model)`` is ``torch.fx.symbolic_trace`` with three additions: timm's registries of
leaf modules and autowrapped functions, every module class that has a rule as a leaf (its rule,
not its code, says how it moves axes), and a :class:`TraceError` that names the module that
failed and the fix::

    gm = fx_capture(torchvision.models.resnet18())
    print(gm.graph)
"""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import TraceError
from .registry import has_module_rule

__all__ = ["fx_capture", "target_name", "unproxy"]


def _timm_registries() -> tuple[set[type], list[Callable]]:
    """timm's leaves, once timm is imported (a model without timm's layers has no use for them)."""
    if "timm" not in sys.modules:
        return set(), []
    from timm.layers import get_notrace_functions, get_notrace_modules

    return set(get_notrace_modules()), list(get_notrace_functions())


class _Tracer(fx.Tracer):
    """fx tracer that knows timm's leaves and remembers which module failed to trace."""

    def __init__(self, leaves: set[type], autowrap: list[Callable]):
        super().__init__(autowrap_functions=tuple(autowrap))
        self.leaves = leaves
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        cls = type(m)
        return cls in self.leaves or has_module_rule(cls) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module sees the error first
                self.failed_in = self.path_of_module(m)
            raise


def _defaults_after(model: nn.Module, n_inputs: int) -> dict[str, Any]:
    """Defaults of ``forward``'s parameters after the first ``n_inputs`` (e.g. ``mask=None``).

    Traced as constants, so that ``if mask is not None`` takes the branch the call will take;
    a proxy for them would take the other one (timm's Hiera).
    """
    params = inspect.signature(model.forward).parameters.values()
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return {p.name: p.default for p in named[n_inputs:] if p.default is not p.empty}


def fx_capture(model: nn.Module, n_inputs: int | None = None) -> fx.GraphModule:
    """Trace ``model`` with timm's leaf modules; raise :class:`TraceError` naming the culprit.

    With ``n_inputs``, forward's later parameters are fixed at their defaults.
    """
    leaves, autowrap = _timm_registries()
    tracer = _Tracer(leaves, autowrap)
    concrete = None if n_inputs is None else _defaults_after(model, n_inputs) or None
    try:
        graph = tracer.trace(model, concrete_args=concrete)
    except Exception as e:
        where = tracer.failed_in or ""
        mod = model.get_submodule(where)
        where = where or "<root>"
        said = unproxy(str(e))
        raise TraceError(
            f"torch.fx cannot trace module '{where}' ({type(mod).__name__}): "
            f"{type(e).__name__}: {said}. Fix: register that module class as a leaf with a rule "
            f"(`@permask.register_rule({type(mod).__name__})`, see docs/graph.md), or make its "
            "forward free of control flow that depends on tensor values."
        ) from e
    return fx.GraphModule(tracer.root, graph)


def unproxy(text: str, values: dict[str, Any] | None = None) -> str:
    """``text`` with fx's stand-ins (``Proxy(getitem_2)``) replaced by the value the node had
    (from ``values``, node name -> value), else by ``<a traced value>``."""

    def value(m: re.Match) -> str:
        v = (values or {}).get(m.group(1), m)
        return "<a traced value>" if v is m else str(v)

    return re.sub(r"Proxy\((\w+)\)", value, text)


def target_name(node: fx.Node) -> str:
    """A readable name of what ``node`` calls: ``torch.cumsum``, ``add``, ``layer1.0.conv1``."""
    t = node.target
    if isinstance(t, str):
        return t
    if isinstance(t, torch._ops.OpOverload):  # the export front end's ATen operators
        return str(t)
    mod = getattr(t, "__module__", None) or ""
    name = getattr(t, "__name__", repr(t))
    return f"{mod}.{name}" if mod and mod != "_operator" else name
