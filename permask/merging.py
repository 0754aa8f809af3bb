"""Model merging (Git Re-Basin, Ainsworth et al., ICLR 2023): align every model to a reference,
then average their weights::

    merged = permask.merge([model_a, model_b, model_c], train_loader)   # activation matching
    merged = permask.merge(models, method="weight", graph=graph)        # no data needed
    merged = permask.merge(models, loader, orthogonal="weight")  # + residual/RoPE rotations
    merged = permask.merge(models, loader, method="ste", orthogonal="learned")  # maps learned

    from permask.merging import average
    naive = average(models, bn_loader=train_loader)                     # not aligned

Averaging independently trained networks without aligning them lands far outside every basin
(near-chance accuracy); aligned, they share one and the average keeps most of their accuracy.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ._batches import first_inputs, to_device
from ._modules import check_same_architecture, model_device, unwrap, usable_device
from .graph import Permutation, PermutationGraph, head_sites, trace
from .graph.orthogonal import orthogonal_groups
from .graph.turn import within_heads
from .match import align, match_rotations
from .match.heads import match_heads
from .match.learned_maps import learn_rotations
from .match.matchers import get_matcher
from .metrics import _reset_bn
from .permute import permute_model
from .repair import Repair
from .rotate import fold_norms, rotate_model

__all__ = ["merge", "average", "turned_onto", "ORTHOGONAL"]

#: How the maps beyond permutations are found: by the weights, the activations, or by the
#: weights and then learned on the midpoint's loss (None: permutations only)
ORTHOGONAL = (None, "weight", "activation", "learned")


def merge(
    models: Sequence[nn.Module],
    loader: Iterable | None = None,
    *,
    reference: int = 0,
    method: str = "activation",
    graph: PermutationGraph | None = None,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    bn_loader: Iterable | None = None,
    repair: bool = False,
    max_stats_memory: int | str | None = None,
    stats_dtype: str = "float64",
    orthogonal: str | None = None,
) -> nn.Module:
    """A new model: the uniform average of ``models`` after aligning each to ``models[reference]``.

    Every other model ``m`` is moved by ``permute_model(m, align(m, ref, loader, method=method,
    graph=graph, max_batches=max_batches, device=device, max_stats_memory=...,
    stats_dtype=...), graph)``;
    ``method="activation"`` (the default) needs ``loader``, ``"weight"`` does not. ``graph`` is
    traced once from the reference on the loader's first batch when not given (one more
    ``iter(loader)``: a loader that reshuffles per iteration then gives ``align`` other batches
    than with ``graph=``).
    Then :func:`average` (float entries averaged in float64, other buffers from the reference),
    which re-estimates BatchNorm statistics on ``bn_loader`` (default: ``loader``; at most
    ``max_batches``) when both exist.
    ``repair=True`` then applies REPAIR (:mod:`permask.repair`) on ``bn_loader`` (default
    ``loader``): hidden channels that no BatchNorm renormalises get the average of the aligned
    models' per-channel means and standard deviations.
    ``orthogonal="weight"`` or ``"activation"`` then also turns each aligned model onto the
    reference by the orthogonal maps beyond permutations that the graph admits (the residual
    stream of pre-norm models, RoPE's frequency planes, attention's value and query/key heads;
    docs/alignment.md, "Beyond permutations"): every model's norms are folded
    (:func:`permask.fold_norms`, so the result's norm gains are ones) and
    :func:`permask.match_rotations` finds the maps by the weights or on ``loader``'s
    activations; a ``UserWarning`` says when the graph admits none.
    ``orthogonal="learned"`` finds them by the weights and then learns them further on the
    midpoint's loss over ``loader`` (:func:`permask.match.learned_maps.learn_rotations`). With
    a matcher that learns from the loss (``"ste"``), the models are first aligned by weight
    matching and the matcher runs once, after the maps (:func:`turned_onto`).
    The result is on ``device`` (default: the reference's), in eval mode when its statistics
    were re-estimated. The models are never modified. ``ValueError`` for fewer than two models,
    a reference out of range, models of different architectures, or missing data.
    """
    models = _checked(models, reference)
    if get_matcher(method).needs_data and loader is None:
        raise ValueError(f"merge with method={method!r} needs a loader; or method='weight'")
    if orthogonal not in ORTHOGONAL:
        raise ValueError(f"orthogonal must be None, 'weight', 'activation' or 'learned', got "
                         f"{orthogonal!r}")  # fmt: skip
    if orthogonal in ("activation", "learned") and loader is None:
        raise ValueError(f"merge with orthogonal={orthogonal!r} needs a loader; or 'weight'")
    ref = models[reference]
    if graph is None:
        graph = _trace_reference(ref, loader)
    # a matcher that learns runs once, after the maps (turned_onto): weight matching first
    first = "weight" if orthogonal is not None and get_matcher(method).learns else method
    moved = []
    for i, m in enumerate(models):
        if i == reference:
            moved.append(ref)
            continue
        pi = align(m, ref, loader, method=first, graph=graph, max_batches=max_batches,
                   device=device, max_stats_memory=max_stats_memory,
                   stats_dtype=stats_dtype)  # fmt: skip
        moved.append(permute_model(m, pi, graph))
    if orthogonal is not None:
        moved = turned_onto(moved, reference, graph, loader, orthogonal=orthogonal, method=method,
                            max_batches=max_batches, device=device,
                            max_stats_memory=max_stats_memory, stats_dtype=stats_dtype)  # fmt: skip
    bn_data = bn_loader if bn_loader is not None else loader
    merged = average(moved, reference=reference, bn_loader=bn_data, max_batches=max_batches,
                     device=device)  # fmt: skip
    if not repair:
        return merged
    if bn_data is None:
        raise ValueError("merge with repair=True needs a loader (or bn_loader) to measure on")
    fix = Repair(moved, bn_data, graph=graph, max_batches=max_batches, device=device)
    return fix(merged)


def turned_onto(
    models: Sequence[nn.Module], reference: int, graph: PermutationGraph, loader=None, *,
    orthogonal: str = "weight", method: str = "weight", rounds: int = 10,
    max_batches: int | None = None, **align_options,
) -> list[nn.Module]:  # fmt: skip
    """``models`` (already permuted onto ``models[reference]``) with their norms folded and
    each turned onto the reference by the orthogonal maps the graph admits, found by the
    weights (``orthogonal="weight"``) or on ``loader``'s activations (``"activation"``). A
    permutation found before the maps may be wrong where the groups it moves meet a rotated
    one (the q/k/MLP inputs of a turned residual stream), so the permutation (``method``, on
    ``loader`` if it needs data) and the maps are found again in turn until the permutation
    is the identity, at most ``rounds`` times. A matcher that learns from the loss (``"ste"``)
    would undo in each round what the maps did, and the maps what it learned: its rounds are
    found by weight matching, and it runs once on ``loader`` after them, moving the turned
    model by its permutation. ``orthogonal="learned"`` finds the rounds' maps by the weights,
    and last (after the learning matcher) learns them further on the midpoint's loss over
    ``loader`` (:func:`permask.match.learned_maps.learn_rotations`). A graph that admits no
    map gets a ``UserWarning`` and the models back unchanged (moved by a learning matcher all
    the same). At most ``max_batches`` batches are read each time; ``align_options``
    (``device``, ``max_stats_memory``, ...) go to :func:`align`."""
    found = orthogonal_groups(graph)
    sites = head_sites(graph)
    # the maps of these groups and sites include every permutation of them
    turned = {g for g, a in found.items() if a.admitted} | within_heads(graph, sites)
    learns = get_matcher(method).learns
    admits = any(a.admitted for a in found.values())
    maps = bool(admits or sites)
    if not admits:  # the residual stream is refused: say why, and what is left
        widest = max(graph, key=lambda g: len(g.members), default=None)
        why = f"; its widest group {widest.name}: {found[widest.name].reason}" if widest else ""
        left = (
            f"the maps of its {len(sites)} attention sites only" if sites else "permutations only"
        )
        warnings.warn(f"no group admits an orthogonal map (permask.orthogonal_groups): {left}"
                      f"{why}", UserWarning, stacklevel=3)  # fmt: skip
    if not maps and not learns:
        return list(models)
    folded = [fold_norms(m, graph) for m in models] if maps else list(models)
    ref = folded[reference]
    if orthogonal in ("activation", "learned") and loader is None:
        raise ValueError(f"turned_onto with orthogonal={orthogonal!r} needs a loader")
    batches = None
    if loader is not None:
        batches = loader if max_batches is None else list(itertools.islice(loader, max_batches))
    data = batches if orthogonal == "activation" else None
    options = dict(max_batches=max_batches, **align_options)
    out = []
    for i, m in enumerate(folded):
        if i == reference:
            out.append(m)
            continue
        if maps:
            m = _turned(m, ref, graph, data, loader, turned, rounds, sites,
                        method="weight" if learns else method, **options)  # fmt: skip
        if learns:
            m = permute_model(m, align(m, ref, loader, method=method, graph=graph, **options),
                              graph)  # fmt: skip
        if maps and orthogonal == "learned":
            device = align_options.get("device")
            m = rotate_model(m, learn_rotations(ref, m, graph, batches, device=device), graph)
        out.append(m)
    return out


def _turned(m: nn.Module, ref: nn.Module, graph, data, loader, turned: set, rounds: int,
            sites: list, **align_options) -> nn.Module:  # fmt: skip
    """``m`` turned onto ``ref`` by the maps (on ``data``'s activations, or the weights), then
    the permutation of the groups outside ``turned`` and the maps found again in turn. In the
    rounds, whole heads that the sites' maps turn are matched up to those maps
    (:func:`match_heads`), not by the method: their entries are what the maps scramble."""
    m = rotate_model(m, match_rotations(ref, m, graph, data), graph)
    for _ in range(rounds):
        pi = align(m, ref, loader, graph=graph, **align_options)
        heads = match_heads(m, ref, graph, sites)
        pi = Permutation({**{g: p for g, p in pi.items() if g not in turned}, **heads})
        if pi.is_identity():
            break
        m = permute_model(m, pi, graph)
        m = rotate_model(m, match_rotations(ref, m, graph, data), graph)
    return m


def average(
    models: Sequence[nn.Module],
    *,
    reference: int = 0,
    bn_loader: Iterable | None = None,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """A new model whose float state-dict entries are the uniform mean of ``models``' (no
    alignment: the naive merge, or the last step of :func:`merge`).

    The mean is taken in float64 and cast back to each entry's dtype; non-float buffers (BatchNorm
    batch counters) are the reference's. With ``bn_loader``, BatchNorm running statistics are
    re-estimated by one pass (at most ``max_batches``) in train mode with an exact cumulative
    average, as :func:`permask.metrics.interpolate` does; the model is then in eval mode. The
    result is a copy of ``models[reference]`` on ``device`` (default: the reference's).
    """
    models = _checked(models, reference)
    ref = models[reference]
    dev = usable_device(device, "merge") if device is not None else model_device(ref)
    sds = [m.state_dict() for m in models]
    mean = {}
    for k, v in sds[reference].items():
        if v.is_floating_point():
            stacked = torch.stack([sd[k].detach().to(dev, torch.float64) for sd in sds])
            mean[k] = stacked.mean(0).to(v.dtype)
        else:
            mean[k] = v.to(dev)
    merged = copy.deepcopy(ref).to(dev)
    merged.load_state_dict(mean)
    if bn_loader is not None:
        with torch.no_grad():
            _reset_bn(merged, bn_loader, dev, max_batches)
    return merged


def _checked(models: Sequence[nn.Module], reference: int) -> list[nn.Module]:
    """The unwrapped models, after checking their count, ``reference`` and architectures."""
    models = [unwrap(m) for m in models]
    if len(models) < 2:
        raise ValueError(f"merging needs at least 2 models, got {len(models)}")
    if not 0 <= reference < len(models):
        raise ValueError(f"reference must be in 0..{len(models) - 1}, got {reference}")
    for i, m in enumerate(models):
        try:
            check_same_architecture(models[reference], m)
        except ValueError as err:
            raise ValueError(f"model {i} is not the reference's architecture: {err}") from None
    return models


def _trace_reference(ref: nn.Module, loader: Iterable | None) -> PermutationGraph:
    if loader is None:
        raise ValueError("merge needs graph= or a loader to trace the reference on")
    return trace(ref, to_device(first_inputs(loader), model_device(ref)))
