"""Capture a model with ``torch.export`` (the export front end of :func:`permask.trace`).

``torch.export`` (dynamo) captures models that symbolic tracing cannot: Python control flow on
shapes and configs, ``*args`` splats, keyword inputs (Hugging Face transformers 5 dropped its
torch.fx tracer). Its graph calls ATen operators, whose rules alias the fx ones
(:mod:`permask.graph.rules.aten`). ``export_capture`` returns the *unlifted* module of the
exported program: parameters and buffers are ``get_attr`` nodes under their names in the
original model (``layer1.0.conv1.weight``), so the walker, activation matching and
``permute_model`` read the graph exactly as they read an fx one. Shapes come from the export's
fake tensors (``node.meta["val"]``): no extra forward pass::

    gm, metas = export_capture(torchvision.models.resnet18(), (torch.randn(1, 3, 64, 64),), {})
    print(gm.graph)                   # aten.conv2d.default, aten.batch_norm.default, ...
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_map

from .collapse import collapse_call
from .errors import TraceError
from .rules.aten import register_library_rules
from .rules.experts import is_experts, register_experts_rule
from .shapes import TensorMeta
from .tiles import fold_tiled_copies

__all__ = ["export_capture"]


def export_capture(
    model: nn.Module, args: tuple, kwargs: dict[str, Any]
) -> tuple[fx.GraphModule, dict]:
    """``torch.export`` a copy of ``model`` in eval mode on ``args``/``kwargs``; the unlifted
    graph module and ``{node: TensorMeta or concrete value}``. Raises :class:`TraceError` with
    the exporter's reason when it cannot capture the model. The copy's modules are new (eval
    mode and config changes stay off ``model``); its parameters and buffers are ``model``'s own
    tensors, so no weights are duplicated."""
    work = _shared_copy(model).eval()
    _no_cache(work)
    whole = {name: m for name, m in work.named_modules() if is_experts(m)}
    try:
        program = _export(work, args, kwargs, tuple(whole))
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0]
        raise TraceError(
            f"torch.export could not capture {type(model).__name__}: {type(e).__name__}: {reason}"
        ) from e
    register_library_rules()  # ops the model's own libraries registered with torch
    gm = program.module()
    for node in list(gm.graph.nodes):  # export's input guard: a check, not part of the math
        if node.op == "call_module" and node.target.startswith("_guards") and not node.users:
            gm.graph.erase_node(node)
    for entry in program.module_call_graph:
        if entry.fqn in whole and entry.signature is not None:  # read whole by their rule
            if collapse_call(gm, entry.fqn, entry.signature, whole[entry.fqn]):
                register_experts_rule(type(whole[entry.fqn]))
    fold_tiled_copies(gm)  # a buffer filled slice by slice: the cat it computes
    gm.recompile()
    metas = {node: tree_map(_meta, node.meta.get("val")) for node in gm.graph.nodes}
    return gm, metas


def _export(work: nn.Module, args: tuple, kwargs: dict, whole: tuple[str, ...]):
    """``torch.export`` keeping the call signatures of the modules in ``whole``; without them if
    the exporter cannot keep one (those modules are then walked op by op)."""
    with torch.no_grad():
        if whole:
            try:
                return torch.export.export(
                    work, tuple(args), dict(kwargs) or None, preserve_module_call_signature=whole
                )
            except Exception:
                pass
        return torch.export.export(work, tuple(args), dict(kwargs) or None)


def _shared_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are ``model``'s own tensors."""
    memo: dict[int, Any] = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def _no_cache(model: nn.Module) -> None:
    """Hugging Face models return a key/value cache object by default, which torch.export cannot
    return: the copy being captured runs without it (the cache adds no weights). Every config in
    the model (an encoder-decoder's decoder has its own)."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "use_cache", None):
            config.use_cache = False


def _meta(v: Any) -> Any:
    return TensorMeta(v) if isinstance(v, torch.Tensor) else v
