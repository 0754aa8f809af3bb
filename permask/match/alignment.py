"""``permask.align``: the permutation that moves model A into model B's basin."""

from __future__ import annotations

import copy
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import torch
import torch.distributed as dist
import torch.nn as nn

from .._batches import batch_size, call, split_batch, to_device
from .._modules import check_same_architecture, model_device, unwrap, usable_device
from ..graph import Permutation, PermutationGraph, trace
from .activation import (
    CorrelationStats,
    check_precision,
    constant_counts,
    group_live,
    paired_module,
)
from .assign import assign, column_gaps, conditional, margin
from .lap import solve_lap
from .points import plan_points
from .replay import ShapeReplays
from .weight import weight_matching, weight_scores

__all__ = ["align", "AlignInfo", "check_same_architecture"]

log = logging.getLogger(__name__)


@dataclass
class AlignInfo:
    """What an alignment did.

    ``points``: group -> fx nodes observed (activation); ``unmatched``: groups that no usable
    activation shows, matched by weights instead; ``stats_bytes``: float64 statistics memory
    (activation); ``pass_seconds``: the pass over the data (both forwards and the statistics;
    the rest of ``seconds`` is correlations and assignment, independent of the data size);
    ``objective`` and ``iterations``: sum <W_B, P W_A> and coordinate-descent sweeps (weight);
    ``constant``: unit (its groups joined by " x ") -> how many of A's and of B's elements were
    constant on the data (e.g. ReLUs that never fired), only units that had some (activation).
    The data gives such elements no order: the pairs with a constant element are re-matched
    among themselves by weight matching's scores (pairs of live elements stay the data's; inside
    blocks x within, a block or within element is constant where it is in every block). Logged
    as a warning; more or other data orders them by activations. ``margins``: per group, how
    sure its assignment is (:func:`permask.match.assign.margin`: positive certifies the unique
    optimum; for a group in a nesting, blocks x within, and in weight matching for every group,
    the optimum with the other groups held at their assignments:
    :func:`permask.match.assign.conditional`); ``ties``: groups with elements whose best
    partners tie, and how many (logged as a warning unless constant channels explain them).
    """

    method: str
    seconds: float
    groups: int
    batches: int = 0
    samples: int = 0
    stats_bytes: int = 0
    objective: float | None = None
    iterations: int | None = None
    points: dict[str, list[str]] = field(default_factory=dict)
    unmatched: tuple[str, ...] = ()
    pass_seconds: float = 0.0
    constant: dict[str, tuple[int, int]] = field(default_factory=dict)
    margins: dict[str, float] = field(default_factory=dict)
    ties: dict[str, int] = field(default_factory=dict)


@overload
def align(
    model_a: nn.Module, model_b: nn.Module, loader: Iterable | None = None, *,
    method: str = ..., graph: PermutationGraph | None = ..., example_inputs: Any = ...,
    max_batches: int | None = ..., solver: str = ..., device: torch.device | str | None = ...,
    seed: int = ..., distributed: bool = ..., precision: str | None = ...,
    return_info: Literal[False] = False,
) -> Permutation: ...  # fmt: skip
@overload
def align(
    model_a: nn.Module, model_b: nn.Module, loader: Iterable | None = None, *,
    method: str = ..., graph: PermutationGraph | None = ..., example_inputs: Any = ...,
    max_batches: int | None = ..., solver: str = ..., device: torch.device | str | None = ...,
    seed: int = ..., distributed: bool = ..., precision: str | None = ...,
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
    return_info: bool = False,
) -> Permutation | tuple[Permutation, AlignInfo]:
    """Find ``pi`` such that ``permute_model(model_a, pi, graph)`` lands in model_b's basin.

    ``method="activation"`` (the paper's): one pass over ``loader`` (at most ``max_batches``
    batches of tensors or ``(inputs, targets)`` pairs, used as given), both models in eval mode,
    correlating A's and B's channels at every group's observation points; see
    :mod:`permask.match.points` for which points. ``method="weight"``: Git Re-Basin weight matching,
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
    ``torch.set_float32_matmul_precision``: ``"highest"`` float32, ``"high"`` TF32 (tensor cores;
    on an H200 the ResNet50 data pass 1.24x faster, correlations within 1e-3: docs/benchmarks.md),
    ``None`` follows torch's global setting. On a CPU the products are float32. The forwards are
    the models' own: run ``align`` under ``torch.autocast`` for mixed precision.
    """
    if method not in ("activation", "weight"):
        raise ValueError(f"unknown method {method!r}; choose 'activation' or 'weight'")
    check_precision(precision)  # before any tracing or data
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
    if method == "weight":
        pi, info = _weight(model_a, model_b, graph, dev, seed, solver)
    else:
        if loader is None:
            raise ValueError("activation matching needs a loader; use method='weight' for none")
        pi, info = _activation(
            model_a, model_b, graph, first, batches, dev, solver, distributed, precision
        )
    info.seconds = time.perf_counter() - start
    if distributed:  # every rank has the same statistics; rank 0's answer for certain
        shared = [dict(pi)]
        dist.broadcast_object_list(shared, src=0, device=dev if dev.type == "cuda" else None)
        pi = Permutation(shared[0])
    return (pi, info) if return_info else pi


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


def _weight(model_a, model_b, graph, device, seed, solver) -> tuple[Permutation, AlignInfo]:
    res = weight_matching(
        _on(model_a, device).state_dict(), _on(model_b, device).state_dict(), graph,
        seed=seed, solver=solver,
    )  # fmt: skip
    log.info("weight matching: %d sweeps, objective %.6g", res.iterations, res.objective)
    info = AlignInfo("weight", 0.0, len(graph), objective=res.objective, iterations=res.iterations,
                     margins=res.margins, ties=res.ties)  # fmt: skip
    _warn_ties(res.ties, {})
    return Permutation(res.perms), info


def _dtype_hint(model_a: nn.Module, model_b: nn.Module, inputs: Any) -> str | None:
    """Why a pass may have failed: the models' floating-point dtypes differ from each other or
    from the batch's (both models run on the same batches). ``None`` when they all agree. Only
    consulted after a failure, since a mix can work (bfloat16 and float32 under autocast)."""

    def names(dtypes: set[torch.dtype]) -> str:
        return ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))

    da, db = (
        {p.dtype for p in m.parameters() if p.is_floating_point()} for m in (model_a, model_b)
    )
    if da != db:
        return (
            f"model_a's parameters are {names(da)} but model_b's are {names(db)}; activation "
            f"matching runs both models on the same batches: convert one to the other's dtype "
            f"(e.g. model_b.to(torch.{min(names({d}) for d in da)}))"
        )
    values = inputs.values() if isinstance(inputs, dict) else inputs
    batch = {t.dtype for t in values if isinstance(t, torch.Tensor) and t.is_floating_point()}
    if len(da) == 1 and batch and batch != da:
        return (
            f"the loader's inputs are {names(batch)} but both models are {names(da)}; convert "
            f"the inputs (e.g. in the loader: x.to(torch.{names(da)})) or the models"
        )
    return None


def _on(model: nn.Module, device: torch.device) -> nn.Module:
    return model if model_device(model) == device else copy.deepcopy(model).to(device)


def _activation(model_a, model_b, graph, first, batches, device, solver, distributed, precision):
    """Activation matching: one pass of both models over the data, then one LAP per group."""
    plan = plan_points(graph)
    log.info(
        "activation matching: %d points, %.1f MiB float64 statistics",
        len(plan.points), plan.stats_bytes() / 2**20,
    )  # fmt: skip
    stats = CorrelationStats(plan, device, precision)
    a, b = _on(model_a, device), _on(model_b, device)
    data = itertools.chain([first] if first is not None else [], batches)
    start = time.perf_counter()
    paired = paired_module(a, b, graph.fx_graph, stats)
    if graph.frontend == "export":  # specialised to its example shapes: one per input shape
        pick = ShapeReplays(a, b, graph, stats, paired).module
    else:
        pick = lambda x: paired  # noqa: E731
    n_batches, samples = _stream(a, b, pick, data, device)
    pass_seconds = time.perf_counter() - start
    if distributed:  # each rank streamed its own shard: sum them all
        stats.all_reduce()
        counts = torch.tensor([n_batches, samples], dtype=torch.float64, device=device)
        dist.all_reduce(counts)
        n_batches, samples = (int(c) for c in counts.tolist())
    if n_batches == 0:
        raise ValueError("the loader yielded no batches")
    stats.check_finite()
    live = stats.live()
    constant = {" x ".join(k): c for k, c in constant_counts(live).items() if any(c)}
    if constant and (not distributed or dist.get_rank() == 0):  # one warning
        _warn_constant(constant)
    scores = stats.scores()
    sizes = {g.name: g.size for g in graph}
    perms = assign(scores, sizes, solver)
    perms = _order_constant(perms, live, scores, a.state_dict(), b.state_dict(), graph, solver)
    sure = {g: margin(s, perms[g]) for g, s in conditional(scores, sizes, perms).items()}
    margins, ties = {g: m for g, (m, _) in sure.items()}, {g: t for g, (_, t) in sure.items() if t}
    if plan.unmatched:  # groups no activation shows: weight matching, the others held fixed
        res = weight_matching(
            a.state_dict(), b.state_dict(), graph, solver=solver, init=perms, only=plan.unmatched
        )
        perms, margins, ties = res.perms, {**margins, **res.margins}, {**ties, **res.ties}
    if not distributed or dist.get_rank() == 0:
        _warn_ties(ties, constant)
    points: dict[str, list[str]] = {}
    for p in plan.points:
        for g in (g for u in p.units for g in u.groups):
            points.setdefault(g, []).append(p.node)
    info = AlignInfo(
        "activation", 0.0, len(graph), n_batches, samples, plan.stats_bytes(),
        points=points, unmatched=plan.unmatched, pass_seconds=pass_seconds, constant=constant,
        margins=margins, ties=ties,
    )  # fmt: skip
    return Permutation(perms), info


def _stream(a: nn.Module, b: nn.Module, pick: Callable, data: Iterable, device) -> tuple:
    """Run every batch through both models (eval mode, restored after) by the paired module
    ``pick(inputs)`` returns; (batches, samples)."""
    modes = {m: m.training for m in (*a.modules(), *b.modules())}
    n_batches = samples = 0
    try:
        a.eval()
        b.eval()
        with torch.no_grad():
            for batch in data:
                x = to_device(split_batch(batch)[0], device, non_blocking=True)
                try:
                    call(pick(x), x)
                except (RuntimeError, TypeError) as err:  # TypeError: keyword inputs it lacks
                    if isinstance(err, torch.OutOfMemoryError):
                        raise
                    hint = _dtype_hint(a, b, x) or (
                        f"batch {n_batches} of the loader does not fit the models "
                        f"({type(err).__name__}: {_first_line(err)}); check the loader's "
                        "batches against the example inputs the graph was traced on"
                    )
                    raise ValueError(hint) from err
                n_batches += 1
                samples += batch_size(x)
    finally:
        for m, training in modes.items():
            m.train(training)
    if device.type == "cuda":  # the clock must not stop before the queued work does
        torch.cuda.synchronize(device)
    return n_batches, samples


def _order_constant(perms, live, corr, params_a, params_b, graph, solver: str) -> dict:
    """Pairs the data cannot order, re-matched among themselves by weight matching's scores:
    pairs with a constant element (on either side), and *tied* pairs, whose correlation is
    within 1e-5 (relative) of the best other in its column (units that fire on the same one or
    two samples correlate alike with each other's partners). The weights do order them. Other
    pairs of two live elements are the data's choice: kept, and none is formed anew (a tied
    pair may be re-formed with another tied one). Every group, on its scores with the other
    groups at their assignments (:func:`~permask.match.assign.conditional`): inside blocks x
    within, a block is constant when all its elements are, a within element when it is in
    every block (:func:`~permask.match.activation.group_live`)."""
    sizes = {g.name: g.size for g in graph}
    cond = conditional(corr, sizes, perms)
    flags = group_live(live, sizes)
    tied = {g: _tied(s, perms[g]) for g, s in cond.items()}
    groups = [g for g, (la, lb) in flags.items()
              if not (la.all() and lb.all() and not tied[g].any())]  # fmt: skip
    if not groups:
        return perms
    scores = weight_scores(params_a, params_b, graph, perms, groups)
    out = dict(perms)
    for g in groups:
        la, lb = flags[g]
        p = perms[g].cpu()
        free = tied[g]  # tied pairs, by B's element
        pairs = (~lb | ~la[p] | free).nonzero().flatten()  # B's elements the data cannot order
        sub = scores[g][p[pairs]][:, pairs].double()  # [A's of those pairs, B's]
        both_live = la[p[pairs]][:, None] & lb[pairs][None, :]
        both_live &= ~(free[pairs][:, None] & free[pairs][None, :])
        sub[both_live] = sub.min() - 1 - len(pairs) * (sub.max() - sub.min())
        out[g] = p.clone()
        out[g][pairs] = p[pairs][solve_lap(sub.T, maximize=True, solver=solver)]
    return out


def _tied(score: torch.Tensor, p: torch.Tensor, rtol: float = 1e-5) -> torch.Tensor:
    """Per B element, whether its chosen score is within ``rtol`` (of the largest |score|) of
    the best other A element's in its column, on the CPU."""
    s = score.detach()
    if s.shape[0] < 2:
        return torch.zeros(s.shape[1], dtype=torch.bool)
    return (column_gaps(s, p).abs() <= rtol * s.abs().max()).cpu()


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [""])[0]


def _warn_ties(ties: dict[str, int], constant: dict[str, tuple[int, int]]) -> None:
    """One warning naming the groups whose scores tie elements for reasons other than
    constant channels (those have their own warning)."""
    explained = {g for unit in constant for g in unit.split(" x ")}
    tied = {g: n for g, n in ties.items() if g not in explained}
    if tied:
        worst = max(tied, key=tied.get)
        log.warning(
            "%d group(s) have elements whose best partners tie, so the assignment is one of "
            "several equally good (e.g. '%s': %d elements); AlignInfo.margins and .ties list "
            "them: weights that are equal (e.g. zero-initialised layers) cannot be told apart",
            len(tied), worst, tied[worst],
        )  # fmt: skip


def _warn_constant(constant: dict[str, tuple[int, int]]) -> None:
    worst = max(constant, key=lambda k: max(constant[k]))
    log.warning(
        "activation matching: %d unit(s) have channels that were constant on the data, "
        "ordered by their weights instead (e.g. '%s': %d in model_a, %d in model_b); more or "
        "other data orders them by activations (AlignInfo.constant lists them)",
        len(constant), worst, *constant[worst],
    )  # fmt: skip
