"""Orthogonal maps beyond permutations: fold norm gains, then rotate the groups that admit it.

Which groups admit an orthogonal map, and which gains must be folded first, is decided from the
graph (:mod:`permask.graph.orthogonal`). Masks are moved only by permutations
(:func:`permask.permute_mask`): a rotated weight has no zeros where the mask has them.

>>> import torch, torch.nn as nn, permask
>>> model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
>>> x = torch.randn(5, 3, dtype=torch.float64)
>>> graph = permask.trace(model, x)
>>> folded = permask.fold_norms(model, graph)
>>> rotation = permask.random_rotation(graph)
>>> list(rotation)
['0.weight:0']
>>> turned = permask.rotate_model(folded, rotation, graph)
>>> bool((turned(x) - model(x)).abs().max() < 1e-12)
True
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
import torch.nn as nn

from ._modules import named_tensors, unwrap, write_tensors
from .graph import PermutationGraph
from .graph.orthogonal import Admission, admitted, keeping_ones
from .graph.query_keys import query_key_sites
from .graph.rope import plane_rotations, rope_sites
from .graph.turn import SITE_PREFIXES, turn_tensors
from .graph.values import value_sites

__all__ = [
    "fold_norms", "rotate_model", "rotate_tensors", "random_rotation", "tied_parameters",
    "untie_weights",
]  # fmt: skip


def tied_parameters(model: nn.Module) -> list[tuple[str, str]]:
    """``(name, first name)`` for every name under which ``model`` registers a parameter it
    already registered (an output layer tied to the embedding)."""
    first: dict[int, str] = {}
    out = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(p), name) != name:
            out.append((name, first[id(p)]))
    return out


def untie_weights(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in which a parameter registered under several names (an output layer
    tied to the embedding) is, under every name past its first, a copy of its own: the same
    function, with tensors a norm's gain can be folded into one at a time. A Hugging Face
    model's ``config.tie_word_embeddings`` is set False, so ``save_pretrained`` keeps both."""
    target = copy.deepcopy(unwrap(model))
    tied = tied_parameters(target)
    for name, _ in tied:
        owner, _, attr = name.rpartition(".")
        p = target.get_parameter(name)
        setattr(
            target.get_submodule(owner), attr, nn.Parameter(p.detach().clone(), p.requires_grad)
        )
    config = getattr(target, "config", None)
    if tied and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False
    return target


def fold_norms(model: nn.Module, graph: PermutationGraph, groups=None) -> nn.Module:
    """A copy of ``model`` computing the same function with the gains (and LayerNorm biases) of
    the admitted groups folded into the linear layers they feed: each gain becomes ones and
    each norm bias zeros, ``W`` becomes ``W diag(g)`` and its bias ``c + W b``. Where one of
    those layers has no bias (``Fold.kept``), the norm keeps ``b / g`` instead (a gain with a
    zero then cannot be folded: ``ValueError``)."""
    target = copy.deepcopy(unwrap(model))
    named = named_tensors(target)
    with torch.no_grad():
        for adm in admitted(graph, groups).values():
            for fold in adm.folds:
                g = named[fold.gain]
                if fold.kept:  # b / g stays in the norm and turns with the group
                    if not bool(g.ne(0).all()):
                        raise ValueError(
                            f"the gain {fold.gain} has zeros, so its norm's bias cannot be kept "
                            f"as bias / gain (a layer it feeds has no bias to take it); leave "
                            f"group {adm.group!r} out of the orthogonal maps"
                        )
                    kept = named[fold.bias]
                    kept.copy_((kept.double() / g.double()).to(kept.dtype))
                b = named[fold.bias] if fold.bias is not None and not fold.kept else None
                for w_name, axis, c_name in fold.into:
                    w = named[w_name]
                    if b is not None:
                        shift = torch.tensordot(w.double(), b.double(), dims=([axis], [0]))
                        named[c_name].add_(shift.to(named[c_name].dtype))
                    shape = [1] * w.ndim
                    shape[axis] = -1
                    w.mul_(g.reshape(shape).to(w.dtype))
                g.fill_(1)
                if b is not None:
                    b.zero_()
    return target


def rotate_tensors(
    tensors: Mapping[str, torch.Tensor], rotations: Mapping[str, torch.Tensor],
    graph: PermutationGraph,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """A new dict with every member of each group in ``rotations`` moved as ``v -> O v`` along
    the group's axis and each site inside attention in it (``rope:...`` plane by plane,
    ``value:...`` and ``qk:...`` head by head) turned, after checking every map; folded gains
    and norm biases and other names pass through unchanged."""
    planes = {k: r for k, r in rotations.items() if k.startswith("rope:")}
    heads = {k: m for k, m in rotations.items() if k.startswith(SITE_PREFIXES) and k not in planes}
    groups = {k: o for k, o in rotations.items() if k not in planes and k not in heads}
    adms = admitted(graph, list(groups))
    for name, o in groups.items():
        _check_rotation(name, o, graph.groups[name].size, adms[name], tensors)
    _check_sites(graph, planes)
    _check_heads(graph, heads)
    return turn_tensors(tensors, rotations, graph)


def _check_heads(graph: PermutationGraph, maps: Mapping[str, torch.Tensor]) -> None:
    """Each map of ``maps`` is for a value or query/key site of ``graph``, one orthogonal map
    per (key or value) head."""
    sites = {s.name: s for s in [*value_sites(graph), *query_key_sites(graph)]}
    for name, m in maps.items():
        site = _site_of(name, m, sites, "value or query/key",
                        lambda s: (s.kv_heads, s.head_dim, s.head_dim))  # fmt: skip
        m64 = m.double().cpu()
        eye = torch.eye(site.head_dim, dtype=torch.float64)
        if (m64.transpose(-1, -2) @ m64 - eye).abs().max() > _tolerance(m):
            raise ValueError(f"the map for {name!r} is not orthogonal per head (M^T M != I)")


def _site_of(name: str, m: torch.Tensor, sites: dict, kind: str, shape):
    """The site of ``kind`` named ``name``, checked to exist and to take ``m``'s shape
    (``shape(site)``)."""
    site = sites.get(name)
    if site is None:
        listed = ("permask.rope_sites(graph)" if kind == "RoPE" else
                  "permask.value_sites(graph) or permask.query_key_sites(graph)")  # fmt: skip
        raise ValueError(f"the graph has no {kind} site {name!r}; pass names from {listed} "
                         "(site.name)")  # fmt: skip
    if tuple(m.shape) != shape(site):
        raise ValueError(f"the map for {name!r} has shape {tuple(m.shape)}; it needs "
                         f"{shape(site)}")  # fmt: skip
    return site


def _check_sites(graph: PermutationGraph, planes: Mapping[str, torch.Tensor]) -> None:
    """Each map of ``planes`` is for a RoPE site of ``graph``, one proper 2-D rotation per key
    head and frequency plane."""
    sites = {s.name: s for s in rope_sites(graph)}
    for name, r in planes.items():
        _site_of(name, r, sites, "RoPE", lambda s: (s.kv_heads, s.head_dim // 2, 2, 2))
        r64 = r.double().cpu()
        eye = torch.eye(2, dtype=torch.float64)
        if (r64.transpose(-1, -2) @ r64 - eye).abs().max() > _tolerance(r) or (
            torch.linalg.det(r64) < 0
        ).any():
            raise ValueError(f"the map for {name!r} must be rotations (R^T R = I, det +1): a "
                             "reflection would reverse the angle RoPE adds")  # fmt: skip


def rotate_model(
    model: nn.Module, rotations: Mapping[str, torch.Tensor], graph: PermutationGraph,
    inplace: bool = False,
) -> nn.Module:  # fmt: skip
    """``model`` (a copy, unless ``inplace``) with :func:`rotate_tensors` applied to its
    parameters and buffers, caches cleared as :func:`permask.permute_model` clears them. The
    gains of the rotated groups must be folded first (:func:`fold_norms`); then the function is
    unchanged."""
    target = unwrap(model) if inplace else copy.deepcopy(unwrap(model))
    named = named_tensors(target)
    new = rotate_tensors(named, rotations, graph)
    write_tensors(target, {n: t for n, t in new.items() if t is not named[n]})
    return target


def random_rotation(
    graph: PermutationGraph, generator: torch.Generator | None = None, groups=None
) -> dict[str, torch.Tensor]:
    """A Haar-random orthogonal map (float64) for every admitted group (or those named in
    ``groups``), keeping the all-ones direction where the group requires it; without ``groups``,
    also a random rotation of every frequency plane of every RoPE site (``rope:...``) and a
    Haar-random map of every head of every value and query/key site (``value:...``,
    ``qk:...``)."""
    out = {}
    if groups is None:
        for site in rope_sites(graph):
            shape = (site.kv_heads, site.head_dim // 2)
            angle = torch.rand(shape, generator=generator, dtype=torch.float64) * 2 * torch.pi
            out[site.name] = plane_rotations(angle)
        for site in [*value_sites(graph), *query_key_sites(graph)]:
            out[site.name] = _haar((site.kv_heads, site.head_dim), generator)
    for name, adm in admitted(graph, groups).items():
        k = graph.groups[name].size - (1 if adm.keeps_ones else 0)
        q = _haar((k,), generator)
        out[name] = keeping_ones(q) if adm.keeps_ones else q
    return out


def _haar(shape: tuple[int, ...], generator) -> torch.Tensor:
    """Haar-random orthogonal maps ``[*shape[:-1], n, n]`` (float64), ``n = shape[-1]``."""
    n = shape[-1]
    x = torch.randn(*shape[:-1], n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(x)
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[..., None, :]


def _tolerance(o: torch.Tensor) -> float:
    """How far from orthogonal a map in ``o``'s dtype may be (its rounding, not more)."""
    return 1e-10 if o.dtype == torch.float64 else 1e-5


def _check_rotation(name: str, o: torch.Tensor, n: int, adm: Admission, tensors) -> None:
    if tuple(o.shape) != (n, n):
        raise ValueError(
            f"the map for group {name!r} has shape {tuple(o.shape)}; it needs ({n}, {n})"
        )
    o64 = o.double().cpu()
    eye = torch.eye(n, dtype=torch.float64)
    if (o64.T @ o64 - eye).abs().max() > _tolerance(o):
        raise ValueError(f"the map for group {name!r} is not orthogonal (O^T O != I)")
    if adm.keeps_ones and (o64 @ torch.ones(n, dtype=torch.float64) - 1).abs().max() > _tolerance(
        o
    ):
        raise ValueError(f"the map for group {name!r} must keep the all-ones vector: a LayerNorm "
                         "centres that group")  # fmt: skip
    for fold in adm.folds:
        g = tensors.get(fold.gain)
        b = tensors.get(fold.bias) if fold.bias is not None and not fold.kept else None
        if (g is not None and not bool((g == 1).all())) or (b is not None and bool(b.any())):
            raise ValueError(f"the gain {fold.gain} of group {name!r} is not folded; rotate "
                             "permask.fold_norms(model, graph) instead of the model")  # fmt: skip
