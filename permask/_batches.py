"""What a batch is, one definition for every package (depends on torch only).

A loader yields either input tensors (``x``) or ``(inputs, targets)`` pairs, where ``inputs`` is
a tensor or a tuple of tensors for ``model(*inputs)``; ``(inputs,)`` alone is input-only too.
A dict batch holds keyword inputs for ``model(**inputs)`` (Hugging Face style:
``{"input_ids": ..., "attention_mask": ...}``); its ``"labels"`` entry, if any, is the targets.
Anything else is refused by name: unpacking a tensor would split it into rows, and a third item
has no meaning anyone could guess. :func:`call` and :func:`to_device` work on both kinds of
inputs.

    >>> inputs, targets = split_batch((torch.zeros(2, 3), torch.tensor([0, 1])))
    >>> [tuple(t.shape) for t in inputs], targets.tolist()
    ([(2, 3)], [0, 1])
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch

__all__ = ["split_batch", "batches", "first_inputs", "call", "to_device", "batch_size"]

Inputs = tuple[torch.Tensor, ...] | dict[str, torch.Tensor]


def split_batch(batch: Any, need_targets: bool = False) -> tuple[Inputs, torch.Tensor | None]:
    """``(inputs, targets)`` of one batch; ``targets`` is ``None`` for an input-only batch.

    Raises ``TypeError`` naming the batch when it has neither form, or when ``need_targets``
    and it has no targets.
    """
    inputs, targets = None, None
    if isinstance(batch, dict) and batch and all(isinstance(k, str) for k in batch):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        targets = batch.get("labels")
        if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs.values()):
            inputs = None
    elif isinstance(batch, torch.Tensor):
        inputs = (batch,)
    elif isinstance(batch, (tuple, list)) and len(batch) in (1, 2):
        x = batch[0]
        inputs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
        targets = batch[1] if len(batch) == 2 else None
        tensors = all(isinstance(t, torch.Tensor) for t in inputs)
        if not inputs or not tensors or not isinstance(targets, (torch.Tensor, type(None))):
            inputs = None
    if inputs is None or (need_targets and targets is None):
        need = (
            "loss and accuracy need (inputs, targets) pairs"
            if inputs is not None
            else "a batch must be an input tensor, an (inputs, targets) pair of tensors or a "
            "dict of keyword input tensors"
        )
        raise TypeError(f"the loader yielded {_describe(batch)}; {need}")
    return inputs, targets


def batches(
    loader: Iterable, max_batches: int | None = None, need_targets: bool = False
) -> Iterator[tuple[Inputs, torch.Tensor | None]]:
    """:func:`split_batch` of each of the loader's first ``max_batches`` batches (all if None)."""
    for batch in itertools.islice(loader, max_batches):
        yield split_batch(batch, need_targets)


def first_inputs(loader: Iterable) -> Inputs:
    """The inputs of the loader's first batch (to trace on); ``ValueError`` if it has none."""
    first = next(iter(loader), None)
    if first is None:
        raise ValueError("the loader yielded no batches")
    return split_batch(first)[0]


def call(model: Any, inputs: Inputs) -> Any:
    """``model(**inputs)`` for keyword inputs, else ``model(*inputs)``."""
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def to_device(inputs: Inputs, device: Any, non_blocking: bool = False) -> Inputs:
    """The inputs moved to ``device`` (same kind: tuple or dict)."""
    if isinstance(inputs, dict):
        return {k: v.to(device, non_blocking=non_blocking) for k, v in inputs.items()}
    return tuple(t.to(device, non_blocking=non_blocking) for t in inputs)


def batch_size(inputs: Inputs) -> int:
    """Samples in a batch: the length of its first input tensor."""
    first = next(iter(inputs.values())) if isinstance(inputs, dict) else inputs[0]
    return len(first)


def _describe(batch: Any) -> str:
    if isinstance(batch, torch.Tensor):
        return f"a tensor of shape {tuple(batch.shape)} (inputs only)"
    if isinstance(batch, (tuple, list)):
        kinds = ", ".join(type(t).__name__ for t in batch)
        return f"a {type(batch).__name__} of {len(batch)} items ({kinds})"
    if isinstance(batch, dict):
        kinds = ", ".join(f"{k}: {type(v).__name__}" for k, v in list(batch.items())[:4])
        return f"a dict ({kinds})"
    return f"a {type(batch).__name__}"
