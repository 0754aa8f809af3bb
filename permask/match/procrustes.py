"""Orthogonal maps that bring model B's groups onto model A's: Procrustes on the weights or
the activations, the rotations of RoPE's frequency planes and the maps of attention's value and
query/key heads.

For a group that admits orthogonal maps (:func:`permask.orthogonal_groups`), every member
tensor moves as ``v -> O v`` along the group's axis, so ``sum <A_t, O B_t>`` over the members
is ``<O, M>`` with ``M = sum A_t B_t^T`` (each tensor unfolded with the group's axis first).
Its maximum over orthogonal ``O`` is ``U V^T`` from ``M = U S V^T`` (orthogonal Procrustes);
where a LayerNorm requires ``O 1 = 1`` the same is solved on the complement of the all-ones
direction. Both models must have their norms folded (:func:`permask.fold_norms`): the gains
are then in the weights that are matched. A value site's map of head ``j`` moves the value
projection's rows ``V_j -> M V_j`` and the output projection's columns ``O_j -> O_j M^T``, so
its Procrustes matrix is ``A_Vj B_Vj^T + sum A_Oj^T B_Oj`` (:func:`match_values`); a
query/key site's, ``A_Kj B_Kj^T + sum A_Qh B_Qh^T`` over the query heads ``h`` reading key head
``j`` (:func:`match_query_keys`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from .._modules import model_device, named_tensors, unwrap
from ..graph import PermutationGraph
from ..graph.orthogonal import admitted, keeping_ones, ones_complement, turn_axis
from ..graph.query_keys import QueryKeySite
from ..graph.rope import RopeSite, planes_of
from ..graph.turn import head_sites
from ..graph.values import ValueSite, value_heads
from .by_activation import observe, on_device
from .passes import restricted
from .points import plan_points

__all__ = ["procrustes", "match_rotations", "match_planes", "match_values", "match_query_keys"]


def procrustes(m: torch.Tensor, keeps_ones: bool = False) -> torch.Tensor:
    """The orthogonal ``O`` (float64) maximising ``<O, m>``, for each matrix of a batch ``m``;
    with ``keeps_ones`` (one matrix), among those with ``O 1 = 1``."""
    m = m.double().cpu()
    n = m.shape[0]
    if keeps_ones:
        basis = ones_complement(n)
        return keeping_ones(procrustes(basis.T @ m @ basis))
    u, _, vh = torch.linalg.svd(m)
    return u @ vh


def match_rotations(
    model_a: nn.Module, model_b: nn.Module, graph: PermutationGraph, loader: Iterable | None
    = None, *, groups=None, max_iter: int = 100,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """For each admitted group (or each named in ``groups``), the orthogonal ``O`` that brings
    B onto A; apply it with ``permask.rotate_model(model_b, rotations, graph)``. Both models
    have their norms folded (:func:`permask.fold_norms`).

    Without ``loader``, ``O`` maximises the inner product of A's member tensors with B's after
    ``v -> O v`` (folded gains and norm biases left out). A tensor with the group on two axes
    (a square residual-to-residual layer) makes that quadratic in ``O``: the other axis is then
    held at the current estimate and the Procrustes step repeated until ``O`` stops changing
    (at most ``max_iter`` times), starting from the single-axis members alone.

    With ``loader`` (batches as for :func:`permask.align`), ``O`` maximises the summed
    cross-covariance of A's and B's activations at the group's observation points, one pass
    over the data: the least-squares map of B's activations onto A's.

    Without ``groups``, also every RoPE site's plane rotations (``rope:...``) and every value
    site's and query/key site's head maps (``value:...``, ``qk:...``), by the weights in
    either case (:func:`match_planes`, :func:`match_values`, :func:`match_query_keys`). Their
    head rows and the groups' columns are coupled, so by the weights the two alternate until
    both stop changing (at most ``max_iter`` times).
    """
    adms = admitted(graph, groups)
    a = named_tensors(unwrap(model_a))
    b = named_tensors(unwrap(model_b))
    sites = head_sites(graph) if groups is None else []
    if loader is not None:  # activations of the groups do not depend on the sites' maps
        out = _by_activation(model_a, model_b, graph, adms, loader)
        return {**out, **_site_maps(a, b, graph, out, sites)}
    # the sites' projections turn with their maps each round; every other single-axis term of
    # a group is the same in every round, so it is summed once (``base``)
    moving = {t for s in sites for t in s.tensors}
    parts = {name: _split(_member_axes(graph, adm, a), moving) for name, adm in adms.items()}
    base = {name: _terms(a, b, fixed, None) for name, (fixed, _) in parts.items()}
    heads: dict[str, torch.Tensor] = {}
    for _ in range(max_iter):  # head rows turn by the sites' maps, their columns by the groups
        b_now = _turned_sites(b, heads, sites)
        out = {name: _by_weights(a, b_now, parts[name][1], adm.keeps_ones, max_iter, base[name],
                                 graph.groups[adm.group].size)
               for name, adm in adms.items()}  # fmt: skip
        new = _site_maps(a, b, graph, out, sites)
        done = bool(heads) and all((new[k] - heads[k]).abs().max() < 1e-10 for k in heads)
        heads = new
        if done or not sites:
            break
    return {**out, **heads}


def match_planes(a: dict, b: dict, site: RopeSite) -> torch.Tensor:
    """The rotation of each frequency plane of each key head (``[kv_heads, d/2, 2, 2]``) that
    brings B's q and k projections (weights and biases; A's and B's tensors by name in ``a``
    and ``b``) closest to A's: a 2-D Procrustes per plane, rotations only (det +1)."""
    m = 0
    for tensor, key in site.projections:
        heads = site.kv_heads if key else site.heads
        ta, tb = (planes_of(x[tensor].detach().double().cpu(), heads, site.kv_heads,
                            site.head_dim) for x in (a, b))  # fmt: skip
        m = m + torch.einsum("krpiz,krqiz->kipq", ta, tb)
    u, _, vh = torch.linalg.svd(m)
    flip = torch.ones(*m.shape[:-1], dtype=torch.float64)
    flip[..., 1] = torch.sign(torch.linalg.det(u @ vh))
    return (u * flip[..., None, :]) @ vh


def match_values(a: dict, b: dict, site: ValueSite) -> torch.Tensor:
    """The orthogonal map of each value head (``[kv_heads, d, d]``) that brings B's value and
    output projections (A's and B's tensors by name in ``a`` and ``b``) closest to A's: one
    Procrustes per head on ``A_V B_V^T + sum A_O^T B_O`` (module docstring)."""
    m = 0
    for t in site.tensors:
        ha, hb = (value_heads(x[t].detach().double().cpu(), site, t) for x in (a, b))
        if t == site.out:  # [rest, kv, heads / kv, d]: sum over the rest and the query heads
            m = m + torch.einsum("okrp,okrq->kpq", ha, hb)
        else:  # [kv, d, rest]
            m = m + ha @ hb.transpose(-1, -2)
    return procrustes(m)


def match_query_keys(a: dict, b: dict, site: QueryKeySite) -> torch.Tensor:
    """The orthogonal map of each key head (``[kv_heads, d, d]``), shared by the query heads
    that read it, that brings B's query and key projections closest to A's: one Procrustes per
    key head on ``sum A_Q B_Q^T + A_K B_K^T`` over its query heads and itself."""
    m = 0
    for t in site.tensors:
        pairs = zip(*(site.heads_of(x[t].detach().double().cpu(), t) for x in (a, b)))
        for (ha, is_key), (hb, _) in pairs:
            c = ha @ hb.transpose(-1, -2)  # [heads, d, d]
            m = m + (c if is_key else c.reshape(site.kv_heads, -1, *c.shape[1:]).sum(1))
    return procrustes(m)


def _match(a: dict, b: dict, site) -> torch.Tensor:
    if isinstance(site, ValueSite):
        return match_values(a, b, site)
    return match_query_keys(a, b, site) if isinstance(site, QueryKeySite) else match_planes(
        a, b, site)  # fmt: skip


def _site_maps(a: dict, b: dict, graph, maps: dict, sites: list) -> dict:
    """Each site's maps, from B's projections with the group ``maps`` applied."""
    turned = dict(b)
    touched = {t for s in sites for t in s.tensors}
    for name, o in maps.items():
        for m in graph.groups[name].members:
            if m.tensor in touched:
                turned[m.tensor] = turn_axis(turned[m.tensor].detach(), m.axis, o)
    return {s.name: _match(a, turned, s) for s in sites}


def _turned_sites(b: dict, maps: dict, sites: list) -> dict:
    out = dict(b)
    for s in sites:
        for t in s.tensors if s.name in maps else ():
            out[t] = s.turn(out[t].detach(), maps[s.name], t)
    return out


def _member_axes(graph, adm, a: dict) -> dict[str, list[int]]:
    """The group's member axes per tensor (folded gains and norm biases left out)."""
    axes: dict[str, list[int]] = {}
    for m in graph.groups[adm.group].members:
        if m.tensor not in adm.folded and m.tensor in a:
            axes.setdefault(m.tensor, []).append(m.axis)
    return axes


def _split(axes: dict[str, list[int]], moving: set[str]) -> tuple[dict, dict]:
    """``axes`` as (the tensors holding the group on one axis that no plane turns, the rest)."""
    fixed = {t: x for t, x in axes.items() if t not in moving and len(x) == 1}
    return fixed, {t: x for t, x in axes.items() if t not in fixed}


def _by_weights(a: dict, b: dict, axes: dict, keeps_ones: bool, max_iter: int, base,
                size: int) -> torch.Tensor:  # fmt: skip
    """Procrustes on ``base`` (the terms summed already) plus ``axes``' terms, for a group of
    ``size``; iterated while some tensor holds the group on two axes."""
    o = _solve(a, b, axes, keeps_ones, None, base, size)
    if any(len(v) > 1 for v in axes.values()):
        for _ in range(max_iter):
            new = _solve(a, b, axes, keeps_ones, o, base, size)
            done = bool((new - o).abs().max() < 1e-10)
            o = new
            if done:
                break
    return o


def _terms(a, b, axes: dict[str, list[int]], o):
    """The sum of each (tensor, axis) term ``A_axis B_axis^T``, B's other axes of the group
    turned by ``o`` (or, without ``o``, only tensors holding the group on one axis); 0 if
    there is none."""
    m = 0
    for tensor, those in axes.items():
        if o is None and len(those) > 1:
            continue
        for axis in those:
            tb = b[tensor].detach().double().cpu()
            for other in those:
                if other != axis:
                    tb = turn_axis(tb, other, o)
            n = tb.shape[axis]
            ta = a[tensor].detach().double().cpu().movedim(axis, 0).reshape(n, -1)
            m = m + ta @ tb.movedim(axis, 0).reshape(n, -1).T
    return m


def _solve(a, b, axes: dict[str, list[int]], keeps_ones: bool, o, base, size: int) -> torch.Tensor:
    """One Procrustes step on ``base`` plus ``axes``' terms (:func:`_terms`)."""
    m = base + _terms(a, b, axes, o)
    if not isinstance(m, torch.Tensor):  # only two-axis members: start from the identity
        return torch.eye(size, dtype=torch.float64)
    return procrustes(m, keeps_ones)


def _by_activation(a: nn.Module, b: nn.Module, graph, adms: dict, loader: Iterable) -> dict:
    device = model_device(a)
    plan = restricted(plan_points(graph), set(adms))
    stats, batches, _ = observe(a, on_device(b, device), graph, plan, loader, device)
    if batches == 0:
        raise ValueError("the loader yielded no batches")
    stats.check_finite()
    cov = stats.covariances()
    missing = [g for g in adms if (g,) not in cov]
    if missing:
        raise ValueError(f"group {missing[0]!r} has no observation point; match it without a "
                         "loader (by the weights)")  # fmt: skip
    return {g: procrustes(cov[(g,)], adm.keeps_ones) for g, adm in adms.items()}
