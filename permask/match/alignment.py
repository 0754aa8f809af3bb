"""``permask.align``: the permutation that moves model A into model B's basin."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator
from typing import Any, Literal, overload

import torch
import torch.distributed as dist
import torch.nn as nn

from .._batches import split_batch, to_device
from .._modules import check_same_architecture, model_device, unwrap, usable_device
from ..graph import Permutation, PermutationGraph, trace
from .activation import check_precision
from .info import AlignInfo
from .matchers import get_matcher
from .passes import parse_bytes
from .request import MatchRequest

__all__ = ["align", "AlignInfo", "check_same_architecture"]


@overload
def align(
    model_a: nn.Module, model_b: nn.Module, loader: Iterable | None = None, *,
    method: str = ..., graph: PermutationGraph | None = ..., example_inputs: Any = ...,
    max_batches: int | None = ..., solver: str = ..., device: torch.device | str | None = ...,
    seed: int = ..., distributed: bool = ..., precision: str | None = ...,
    max_stats_memory: int | str | None = ..., stats_dtype: str = ...,
    return_info: Literal[False] = False,
) -> Permutation: ...  # fmt: skip
@overload
def align(
    model_a: nn.Module, model_b: nn.Module, loader: Iterable | None = None, *,
    method: str = ..., graph: PermutationGraph | None = ..., example_inputs: Any = ...,
    max_batches: int | None = ..., solver: str = ..., device: torch.device | str | None = ...,
    seed: int = ..., distributed: bool = ..., precision: str | None = ...,
    max_stats_memory: int | str | None = ..., stats_dtype: str = ...,
    return_info: Literal[True],
) -> tuple[Permutation, AlignInfo]: ...  # fmt: skip
def align(
    model_a: nn.Module,
    model_b: nn.Module,
    loader: Iterable | None = None,
    *,
    method: str = "activation",
    graph: PermutationGraph | None = None,
    example_inputs: Any = None,
    max_batches: int | None = None,
    solver: str = "auto",
    device: torch.device | str | None = None,
    seed: int = 0,
    distributed: bool = False,
    precision: str | None = None,
    max_stats_memory: int | str | None = None,
    stats_dtype: str = "float64",
    return_info: bool = False,
) -> Permutation | tuple[Permutation, AlignInfo]:
    """Find ``pi`` such that ``permute_model(model_a, pi, graph)`` lands in model_b's basin.

    ``method`` names a matcher (:mod:`permask.match.matchers`). ``"activation"`` (the paper's):
    one pass over ``loader`` (at most ``max_batches`` batches of tensors or ``(inputs, targets)``
    pairs, used as given), both models in eval mode, correlating A's and B's channels at every
    group's observation points; see :mod:`permask.match.points` for which points.
    ``method="weight"``: Git Re-Basin weight matching,
    no data needed (``seed`` orders the coordinate descent). Without ``graph``, ``model_a`` is
    traced on the loader's first batch (or ``example_inputs``). Work runs on ``device`` (default:
    model_a's device; models elsewhere are copied there). Neither model is modified (modes are
    restored). With ``return_info=True`` also returns an :class:`AlignInfo`.

    ``distributed=True`` (an initialized ``torch.distributed`` default group): every rank calls
    ``align`` with its own shard of the data; the statistics are summed over the ranks and every
    rank returns rank 0's (identical) permutation, the one a single process streaming every
    shard would find. Off by default, so a call on one rank alone never waits for the others.
    Wrapped models (DDP, ``torch.compile``) are looked through.

    ``precision`` (activation): the statistics' matrix products on CUDA, named as in
    ``torch.set_float32_matmul_precision``: ``"highest"`` float32, ``"high"`` TF32 (tensor cores:
    faster, correlations within about 1e-3; docs/benchmarks.md, "ResNet50 at ImageNet scale on
    one GPU"), ``None`` follows torch's global
    setting. On a CPU the products are float32. The forwards are
    the models' own: run ``align`` under ``torch.autocast`` for mixed precision.

    ``max_stats_memory`` (activation; bytes, or a string such as ``"4GiB"``): where the
    statistics of all groups need more, the groups are split into several
    passes over the data, each within it, giving the same permutation
    (:mod:`permask.match.passes`); ``AlignInfo.passes`` says how many. The loader must then be
    readable more than once (a list, a DataLoader), and yield the same batches each time for the
    same result. ``None``: one pass, whatever it needs.

    ``stats_dtype`` (activation): ``"float64"`` (default) or ``"float32"`` sums, half the
    memory (so half the passes under a budget), accurate enough to give the same permutations
    on the models measured (docs/alignment.md, "Under a memory budget").
    """
    matcher = get_matcher(method)
    check_precision(precision)  # before any tracing or data
    if stats_dtype not in STATS_DTYPES:
        raise ValueError(f"stats_dtype must be 'float64' or 'float32', got {stats_dtype!r}")
    budget = None if max_stats_memory is None else parse_bytes(max_stats_memory)
    distributed = _world(distributed)
    model_a, model_b = unwrap(model_a), unwrap(model_b)
    check_same_architecture(model_a, model_b)
    dev = _work_device(model_a, device)
    start = time.perf_counter()
    batches = iter(() if loader is None else itertools.islice(loader, max_batches))
    first = None
    if graph is None:
        if example_inputs is None:
            if loader is None:
                raise ValueError(f"method={method!r} needs graph=, example_inputs= or a loader")
            first = _first_batch(batches, dev, distributed)
            example_inputs = split_batch(first)[0]
        graph = trace(model_a, _example_on(example_inputs, model_device(model_a)))
    again = None
    if loader is not None and not isinstance(loader, Iterator):  # readable more than once
        again = lambda: itertools.islice(loader, max_batches)  # noqa: E731
    request = MatchRequest(
        model_a, model_b, graph, dev, solver, seed, first,
        None if loader is None else batches, distributed, precision, again, budget,
        STATS_DTYPES[stats_dtype],
    )  # fmt: skip
    pi, info = matcher.run(request)
    info.seconds = time.perf_counter() - start
    if distributed:  # every rank has the same statistics; rank 0's answer for certain
        shared = [dict(pi)]
        dist.broadcast_object_list(shared, src=0, device=dev if dev.type == "cuda" else None)
        pi = Permutation(shared[0])
    return (pi, info) if return_info else pi


#: The statistics' dtypes activation matching offers, by name.
STATS_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _example_on(example_inputs: Any, device: torch.device) -> Any:
    """Example inputs (a tensor, a tuple, or a dict of keyword inputs) on ``device``."""
    if isinstance(example_inputs, dict):
        return to_device(example_inputs, device)
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    return to_device(tuple(inputs), device)


def _world(distributed: bool) -> bool:
    """Whether to sum statistics over ranks (``distributed`` and more than one rank)."""
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise ValueError("distributed=True needs torch.distributed.init_process_group() first")
    return distributed and dist.get_world_size() > 1


def _work_device(model_a: nn.Module, device: torch.device | str | None) -> torch.device:
    dev = usable_device(device if device is not None else model_device(model_a), "align")
    if dev.type == "cuda" and dev.index is None:  # as the models' devices are named: cuda:i
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _first_batch(batches: Iterator, device: torch.device, distributed: bool) -> Any:
    """The loader's first batch (to trace on); every rank must have one, or none traces."""
    first = next(batches, None)
    if distributed:  # every rank must trace, or the others would wait forever
        empty = torch.tensor([float(first is None)], device=device)
        dist.all_reduce(empty, op=dist.ReduceOp.MAX)
        if empty.item():
            raise ValueError("a rank's loader yielded no batches; pass graph= to align")
    if first is None:
        raise ValueError("the loader yielded no batches")
    return first
