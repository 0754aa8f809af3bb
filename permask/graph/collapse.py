"""Turn the ATen ops of one module call in an exported graph back into one ``call_module``.

``torch.export`` inlines every module into ATen ops; a module whose rule reads it whole
(transformers' experts, :mod:`permask.graph.rules.experts`) is exported with
``preserve_module_call_signature``, which records the graph values its call took and returned.
:func:`collapse_call` replaces the ops between them by one call of the module itself, with the
exported graph's parameters (same names, same tensors), so the walker applies the module's rule
and the graph still runs. It changes nothing unless the ops form exactly that call: made only
from the recorded inputs and the module's own ops, and used outside only through its output::

    program = torch.export.export(model, (), {"input_ids": ids},
                                  preserve_module_call_signature=("model.layers.0.mlp.experts",))
    gm = program.module()
    collapse_call(gm, entry.fqn, entry.signature, model.model.layers[0].mlp.experts)
"""

from __future__ import annotations

import operator
from typing import Any

import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_unflatten

__all__ = ["collapse_call"]


def collapse_call(gm: fx.GraphModule, fqn: str, signature: Any, module: nn.Module) -> bool:
    """Replace the ops of the call of ``module`` (at ``fqn``) by one ``call_module`` node; False
    (and ``gm`` unchanged) where the recorded call does not delimit them."""
    nodes = {n.name: n for n in gm.graph.nodes}
    inputs = [nodes.get(getattr(a, "name", None)) for a in signature.inputs]
    outputs = [nodes.get(getattr(a, "name", None)) for a in signature.outputs]
    if None in inputs or len(outputs) != 1 or outputs[0] is None or next(module.buffers(), None):
        return False
    out = outputs[0]
    region = _ops_within(gm, fqn)
    if out not in region or not _closed(region, set(inputs), out):
        return False
    args, kwargs = tree_unflatten(inputs, signature.in_spec)
    with gm.graph.inserting_before(out):
        call = gm.graph.call_module(fqn, tuple(args), dict(kwargs))
    call.meta["val"] = out.meta.get("val")
    call.meta["nn_module_stack"] = {
        k: v for k, v in (out.meta.get("nn_module_stack") or {}).items() if not _inside(v[0], fqn)
    }
    out.replace_all_uses_with(call)
    for node in reversed([n for n in gm.graph.nodes if n in region]):
        gm.graph.erase_node(node)
    for name, _ in list(module.named_parameters()):  # the graph's own tensors, by name
        owner, _, attr = name.rpartition(".")
        setattr(module.get_submodule(owner), attr, operator.attrgetter(f"{fqn}.{name}")(gm))
    parent, _, child = fqn.rpartition(".")
    setattr(gm.get_submodule(parent), child, module)
    return True


def _inside(path: str, fqn: str) -> bool:
    return path == fqn or path.startswith(fqn + ".")


def _ops_within(gm: fx.GraphModule, fqn: str) -> set[fx.Node]:
    """The ops the module's forward made, with the attributes only they read."""
    region = {
        n
        for n in gm.graph.nodes
        if n.op in ("call_function", "call_method")
        and any(_inside(v[0], fqn) for v in (n.meta.get("nn_module_stack") or {}).values())
    }
    attrs = {n for n in gm.graph.nodes if n.op == "get_attr" and n.users and set(n.users) <= region}
    return region | attrs


def _closed(region: set[fx.Node], inputs: set[fx.Node], out: fx.Node) -> bool:
    """Whether ``region`` reads only ``inputs`` and itself, and only ``out`` leaves it."""
    for n in region:
        if any(i not in region and i not in inputs for i in n.all_input_nodes):
            return False
        if n is not out and any(u not in region for u in n.users):
            return False
    return True
