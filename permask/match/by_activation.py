"""Activation matching's phases: one pass of both models over the data into correlation
statistics, one assignment per group, then the pairs the data cannot order re-matched by the
weights (:mod:`permask.match.ties`). Registered as the ``"activation"`` matcher
(:mod:`permask.match.matchers`)."""

from __future__ import annotations

import copy
import itertools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from .._batches import batch_size, call, split_batch, to_device
from .._modules import model_device
from ..graph import Permutation
from .activation import CorrelationStats, constant_counts, paired_module
from .assign import OpenMargin, assign, conditional, margin
from .info import AlignInfo
from .passes import components, split_plan
from .points import Plan, plan_points
from .replay import ShapeReplays
from .request import MatchRequest
from .ties import open_columns, order_by_weights, unordered, warn_constant, warn_ties
from .weight import weight_matching

__all__ = ["activation_matching", "on_device", "observe"]

log = logging.getLogger(__name__)


def activation_matching(req: MatchRequest) -> tuple[Permutation, AlignInfo]:
    """Activation matching: one pass of both models over the data (or several, each for some
    groups, under ``max_stats_memory``: :mod:`permask.match.passes`), then one LAP per group."""
    graph = req.graph
    if req.batches is None:
        raise ValueError("activation matching needs a loader; use method='weight' for none")
    plan = plan_points(graph)
    itemsize = req.stats_dtype.itemsize
    passes = split_plan(plan, req.max_stats_memory, itemsize)
    log.info(
        "activation matching: %d points, %.1f MiB %s statistics%s",
        len(plan.points), plan.stats_bytes(itemsize) / 2**20, str(req.stats_dtype)[6:],
        f", in {len(passes)} passes over the data under max_stats_memory" if len(passes) > 1
        else "",
    )  # fmt: skip
    if len(passes) > 1 and req.again is None:
        raise ValueError(
            f"max_stats_memory needs {len(passes)} passes over the data, but the loader is an "
            "iterator that can be read once; pass a list or a DataLoader"
        )
    a, b = on_device(req.model_a, req.device), on_device(req.model_b, req.device)
    seen = []
    for k, sub in enumerate(passes):
        first = [req.first] if req.first is not None and k == 0 else []
        data = itertools.chain(first, req.batches if k == 0 else req.again())
        seen.append(_one_pass(a, b, sub, data, req))
    live = {key: f for s in seen for key, f in s.live.items()}
    constant = {" x ".join(k): c for k, c in constant_counts(live).items() if any(c)}
    if constant and (not req.distributed or dist.get_rank() == 0):  # one warning
        warn_constant(constant)
    perms = {g: p for s in seen for g, p in s.perms.items()}
    todo = {g: t for s in seen for g, t in s.todo.items()}
    sd_a, sd_b = a.state_dict(), b.state_dict()
    perms = order_by_weights(perms, todo, sd_a, sd_b, graph, req.solver)
    sure = {g: m for s in seen for g, m in s.sure.items()}
    kept = {chain: t for s in seen for chain, t in s.kept.items()}  # what the weights changed
    opened = {g: t for s in seen for g, t in s.opened.items()}
    sizes = {g.name: g.size for g in graph}
    sure.update({g: margin(s, perms[g]) for g, s in conditional(kept, sizes, perms).items()})
    sure.update({g: t.margin(perms[g]) for g, t in opened.items()})
    margins, ties = {g: m for g, (m, _) in sure.items()}, {g: t for g, (_, t) in sure.items() if t}
    if plan.unmatched:  # groups no activation shows: weight matching, the others held fixed
        res = weight_matching(sd_a, sd_b, graph, solver=req.solver, init=perms, only=plan.unmatched)
        perms, margins, ties = res.perms, {**margins, **res.margins}, {**ties, **res.ties}
    if not req.distributed or dist.get_rank() == 0:
        warn_ties(ties, constant)
    points: dict[str, list[str]] = {}
    for p in plan.points:
        for g in (g for u in p.units for g in u.groups):
            points.setdefault(g, []).append(p.node)
    info = AlignInfo(
        "activation", 0.0, len(graph), seen[0].batches, seen[0].samples,
        max(sub.stats_bytes(itemsize) for sub in passes), points=points, unmatched=plan.unmatched,
        pass_seconds=sum(s.seconds for s in seen), constant=constant, margins=margins,
        ties=ties, observations=min(s.observed for s in seen), passes=len(passes),
    )  # fmt: skip
    return Permutation(perms), info


@dataclass
class _Seen:
    """What one pass over the data leaves for its groups: assignments, live flags per unit,
    pairs the data cannot order (``todo``), margins, and what the final margins of the groups
    whose assignment the weights may still change need: their scores (``kept``), or for a group
    alone in its component only its open columns (``opened``,
    :class:`~permask.match.assign.OpenMargin`)."""

    perms: dict[str, torch.Tensor]
    live: dict[tuple[str, ...], list[torch.Tensor]]
    todo: dict[str, tuple]
    sure: dict[str, tuple[float, int]]
    kept: dict[tuple[str, ...], torch.Tensor]
    opened: dict[str, OpenMargin]
    batches: int
    samples: int
    seconds: float
    observed: int


def _one_pass(a: nn.Module, b: nn.Module, plan: Plan, data: Iterable, req: MatchRequest) -> _Seen:
    """Stream ``data`` through both models observing ``plan``'s points, then assign its groups."""
    graph, device = req.graph, req.device
    start = time.perf_counter()
    stats, n_batches, samples = observe(a, b, graph, plan, data, device, req.precision,
                                        req.stats_dtype)  # fmt: skip
    seconds = time.perf_counter() - start
    if req.distributed:  # each rank streamed its own shard: sum them all
        stats.all_reduce()
        counts = torch.tensor([n_batches, samples], dtype=torch.float64, device=device)
        dist.all_reduce(counts)
        n_batches, samples = (int(c) for c in counts.tolist())
    if n_batches == 0:
        raise ValueError("the loader yielded no batches")
    stats.check_finite()
    live = stats.live()
    scores = stats.scores(spend=True)  # in the statistics' buffers: what the budget counts
    observed = min((c for row in stats.count for c in row), default=0)
    sizes = {g.name: g.size for g in graph}
    perms = assign(scores, sizes, req.solver)
    todo = unordered(scores, live, perms, sizes)
    sure = {g: margin(s, perms[g]) for g, s in conditional(scores, sizes, perms).items()}
    kept: dict[tuple[str, ...], torch.Tensor] = {}
    opened: dict[str, OpenMargin] = {}
    for comp in (c for c in components(plan) if c & todo.keys()):
        (g, *rest), chains = sorted(comp), [ch for ch in scores if set(ch) <= comp]
        if not rest and scores[(g,)].shape[0] > 1:  # alone: only its open columns can change
            opened[g] = OpenMargin(scores[(g,)], perms[g], open_columns(todo[g], perms[g]))
        else:  # others in its chains may change too: all of its scores
            kept.update({ch: scores[ch] for ch in chains})
    return _Seen(perms, live, todo, sure, kept, opened, n_batches, samples, seconds, observed)


def observe(
    a: nn.Module, b: nn.Module, graph, plan: Plan, data: Iterable, device: torch.device,
    precision: str | None = None, dtype: torch.dtype = torch.float64,
) -> tuple[CorrelationStats, int, int]:  # fmt: skip
    """Stream ``data`` through both models (graph ``graph``), observing ``plan``'s points:
    the statistics (in ``dtype``), and how many batches and samples were seen."""
    stats = CorrelationStats(plan, device, precision, dtype)
    paired = paired_module(a, b, graph.fx_graph, stats)
    if graph.frontend == "export":  # specialised to its example shapes: one per input shape
        pick = ShapeReplays(a, b, graph, stats, paired).module
    else:
        pick = lambda x: paired  # noqa: E731
    n_batches, samples = _stream(a, b, pick, data, device)
    return stats, n_batches, samples


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


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [""])[0]


def on_device(model: nn.Module, device: torch.device) -> nn.Module:
    return model if model_device(model) == device else copy.deepcopy(model).to(device)
