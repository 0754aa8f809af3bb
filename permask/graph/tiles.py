"""Rewrite a buffer filled slice by slice with ``copy_`` into the ``cat`` it computes.

Some models build a tensor by allocating it and copying pieces into slices of it; DeepSeek's
multi-head latent attention assembles each head's key from its plain and its rotary part so::

    key = k_nope.new_empty(*k_nope.shape[:-1], nope + rope)
    key[..., :nope].copy_(k_nope)
    key[..., nope:].copy_(k_rot)

The exported graph holds ``new_empty``, two ``slice`` and two in-place ``copy_`` ops, which no
rule can read as a function of their inputs (``copy_`` returns nothing used; the buffer's later
readers see its mutation), so everything they touch stayed fixed, the attention heads included.
:func:`fold_tiled_copies` replaces such a buffer by ``aten.cat([k_nope, k_rot], -1)``, which
the rules read. It rewrites only where this is the same tensor: the buffer is fresh (``empty``,
``zeros`` and the like), everything that reads it before its last copy is one of the slices,
the slices are plain (step 1) along one dim and tile it exactly, each is written by one
``copy_`` of a tensor with the slice's shape and dtype, and nothing else reads the slices.
Any other graph is left as it is (its ops stay fixed, as before)::

    gm = torch.export.export(model, (x,)).module()
    fold_tiled_copies(gm)             # number of buffers rewritten
    gm.recompile()
"""

from __future__ import annotations

import torch
import torch.fx as fx

__all__ = ["fold_tiled_copies"]

_aten = torch.ops.aten
_FRESH = {
    _aten.empty.memory_format,
    _aten.new_empty.default,
    _aten.zeros.default,
    _aten.new_zeros.default,
    _aten.empty_like.default,
    _aten.zeros_like.default,
}


def fold_tiled_copies(gm: fx.GraphModule) -> int:
    """Replace each fresh buffer that slices and ``copy_`` fill completely by the ``cat`` of
    the copied tensors; the number of buffers rewritten (0: ``gm`` unchanged)."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    folded = 0
    for buffer in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _FRESH]:
        tiles = _tiles(buffer, order)
        if tiles is None:
            continue
        dim, pieces, last = tiles
        with gm.graph.inserting_after(last):
            srcs = [copy.args[1] for _, copy in pieces]
            cat = gm.graph.call_function(_aten.cat.default, (srcs, dim))
        cat.meta.update(buffer.meta)
        order[cat] = order[last] + 0.5  # a later buffer's check may meet it among its readers
        for user in [u for u in buffer.users if order[u] > order[last]]:
            user.replace_input_with(buffer, cat)
        for piece, copy in pieces:
            gm.graph.erase_node(copy)
            gm.graph.erase_node(piece)
        gm.graph.erase_node(buffer)
        folded += 1
    return folded


def _tiles(buffer: fx.Node, order: dict) -> tuple[int, list, fx.Node] | None:
    """(dim, [(slice, copy_), ...] in order along dim, the last copy_ in the graph) where
    ``buffer`` is filled exactly so."""
    value = buffer.meta.get("val")
    if not isinstance(value, torch.Tensor):
        return None
    copies = [u for u in buffer.users if u.target == _aten.copy_.default]
    writes = [u for u in buffer.users if u.target == _aten.slice.Tensor]
    pieces = [_piece(s, value) for s in writes]
    if copies or not pieces or None in pieces:
        return None
    last = max((copy for *_, copy in pieces), key=order.__getitem__)
    readers = [u for u in buffer.users if u not in writes]
    if any(order[u] < order[last] for u in readers) or len({dim for dim, *_ in pieces}) != 1:
        return None
    dim = pieces[0][0]
    spans = sorted((start, stop, s, copy) for _, start, stop, s, copy in pieces)
    edges = [0] + [stop for _, stop, *_ in spans]
    if [start for start, *_ in spans] != edges[:-1] or edges[-1] != value.shape[dim]:
        return None
    return dim, [(s, copy) for *_, s, copy in spans], last


def _piece(node: fx.Node, value: torch.Tensor) -> tuple | None:
    """(dim, start, stop, slice, copy_) of a plain slice of the buffer that one ``copy_``
    fills with a tensor of its shape and dtype; None for anything else."""
    dim, start, stop, step = (list(node.args[1:]) + [0, None, None, 1][len(node.args) - 1 :])[:4]
    if step != 1 or len(node.users) != 1:
        return None
    (copy,) = node.users
    if copy.target != _aten.copy_.default or copy.args[0] is not node or copy.users:
        return None
    src = copy.args[1].meta.get("val") if isinstance(copy.args[1], fx.Node) else None
    target = node.meta.get("val")
    if not isinstance(src, torch.Tensor) or not isinstance(target, torch.Tensor):
        return None
    if src.shape != target.shape or src.dtype != target.dtype or len(copy.args) > 2:
        return None
    dim = dim % value.dim()
    size = value.shape[dim]
    start = 0 if start is None else (start + size if start < 0 else start)
    stop = size if stop is None else min(stop + size if stop < 0 else stop, size)
    return dim, start, stop, node, copy
