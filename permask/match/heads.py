"""Whole attention heads matched up to their maps.

Where a head's dims turn by a map (a value site's orthogonal map, a query/key site's, RoPE's
plane rotations), which head of B is which head of A cannot be read from their entries: the map
scrambles them. Weight matching, comparing entries, then often pairs the wrong heads. Here a
pair of heads scores the most their tensors can agree under the site's map: for a value or
query/key site the nuclear norm of the pair's Procrustes matrix (the sum of its singular values:
the maximum of ``<O, M>`` over orthogonal ``O``), for a RoPE site, per frequency plane, the most
a 2-D rotation can reach (``|M|`` of the plane's matrix read as a complex number). The scores of
a pair add over the sites that share its heads (with the query heads that share them, GQA's
repeats, paired inside the pair by a small LAP first), and one LAP per group of whole key/value
heads gives the permutation. The query heads are then matched likewise across the model:
each pair scored by its own best map (the head's map is shared by its query heads, so this is
an upper bound), summed over the key/value heads as just matched. A
group is matched so only where every tensor it moves is one of those sites' tensors (else part
of its cost would be missing): weight matching keeps the others.

>>> import torch, permask
>>> from permask.match.heads import match_heads
>>> class Attention(torch.nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.q, self.k, self.v = (torch.nn.Linear(8, 12) for _ in range(3))
...         self.o = torch.nn.Linear(12, 8)
...     def forward(self, x):
...         q, k, v = (p(x).view(2, 5, 4, 3).transpose(1, 2) for p in (self.q, self.k, self.v))
...         y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
...         return x + self.o(y.transpose(1, 2).reshape(2, 5, 12))
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<...>
>>> a, x = Attention().double(), torch.randn(2, 5, 8, dtype=torch.float64)
>>> graph = permask.trace(a, x)
>>> pi = permask.random_permutation(graph, torch.Generator().manual_seed(1))
>>> maps = permask.random_rotation(graph, torch.Generator().manual_seed(2))
>>> b = permask.rotate_model(permask.permute_model(a, pi, graph), maps, graph)
>>> found = match_heads(a, b, graph)
>>> all(torch.equal(found[g], pi[g]) for g in found)
True
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn

from .._modules import named_tensors, unwrap
from ..graph import Permutation, PermutationGraph
from ..graph.layout import group_element_map
from ..graph.query_keys import QueryKeySite
from ..graph.rope import RopeSite, planes_of
from ..graph.turn import Site, head_sites
from ..graph.values import ValueSite, value_heads
from .lap import solve_lap

__all__ = ["match_heads", "head_scores"]


def match_heads(
    model_a: nn.Module, model_b: nn.Module, graph: PermutationGraph,
    sites: list[Site] | None = None,
) -> Permutation:  # fmt: skip
    """The permutation of whole key/value heads, and of the query heads that share one (GQA's
    repeats), that brings A's heads onto B's whatever the sites' maps (module docstring), for
    each group of heads that the sites cover; other groups (and a site's single key/value
    head) are absent.
    ``permask.permute_model(model_a, pi, graph)`` then has its heads where B has them, each up
    to its map."""
    a = {k: v.detach() for k, v in named_tensors(unwrap(model_a)).items()}
    b = {k: v.detach() for k, v in named_tensors(unwrap(model_b)).items()}
    sites = head_sites(graph) if sites is None else sites
    kv_groups = [_head_groups(graph, *_kv_rows(s)) for s in sites]
    kv = _solved(graph, [(head_scores(b, a, s), s.tensors, groups)  # [B's, A's]
                         for s, groups in zip(sites, kv_groups) if s.kv_heads > 1])  # fmt: skip
    repeats = []
    for s, groups in zip(sites, kv_groups):
        if s.heads > s.kv_heads:  # read beside the key/value heads just matched
            order = _kv_order(kv, groups, s.kv_heads)
            repeats += [(pair, [rows[0]], _head_groups(graph, *rows))
                        for pair, rows in _repeat_scores(b, a, s, order)]  # fmt: skip
    return Permutation({**kv, **_solved(graph, repeats)})


def _solved(graph: PermutationGraph, parts: list) -> dict[str, torch.Tensor]:
    """One LAP per group over the scores of ``parts`` (``[B's head, A's head]`` scores, the
    tensors they read, the groups with their elements per head), for each group whose every
    member is one of the tensors read."""
    scores: dict[str, torch.Tensor] = {}
    covered: dict[str, set[str]] = {}
    for pair, tensors, groups in parts:
        for group, elements in groups.items():
            n = graph.groups[group].size
            score = scores.setdefault(group, torch.zeros(n, n, dtype=torch.float64))
            score[elements[:, None], elements[None, :]] += pair
            covered.setdefault(group, set()).update(tensors)
    return {
        g: solve_lap(score, maximize=True)
        for g, score in scores.items()
        if all(m.tensor in covered[g] for m in graph.groups[g].members)
    }


def _kv_order(found: dict, groups: dict, kv: int) -> torch.Tensor:
    """For each of B's key/value heads, A's head matched to it: by the permutation ``found``
    for their group, else the one in its place."""
    for g, elements in groups.items():
        if g in found:
            head_of = torch.empty_like(elements)
            head_of[elements] = torch.arange(len(elements))
            return head_of[found[g][elements]]
    return torch.arange(kv)


def head_scores(a: dict, b: dict, site: Site) -> torch.Tensor:
    """``[kv_heads, kv_heads]``: how far A's key/value head ``i`` and B's head ``j`` (tensors by
    name in ``a`` and ``b``) can agree under ``site``'s map (module docstring), with the query
    heads that share them (GQA's repeats) paired by a small LAP inside each pair of heads."""
    score = _rotation_score if isinstance(site, RopeSite) else _procrustes_score
    kv, repeats = 0, None  # [i, j, *map], [i, j, r, s, *map]
    for m in _head_products(a, b, site):
        if m.shape[2] == 1:
            kv = kv + m[:, :, 0, 0]
        elif repeats is None:
            repeats = m
        else:
            repeats += m
        del m  # freed before the next product is made
    if repeats is not None:
        kv = kv + _paired_repeats(repeats, score)
    return score(kv)


def _head_products(a: dict, b: dict, site: Site) -> Iterator[torch.Tensor]:
    """Per tensor of ``site``, the products of A's and B's heads whose best map scores them:
    ``[kv, kv, r, s, *map]`` for A's query head ``(i, r)`` and B's ``(j, s)``, where ``r`` and
    ``s`` run over one (key/value-head tensors) or the query heads sharing a key/value head;
    one at a time (a large GQA model's are hundreds of MB each)."""
    if isinstance(site, RopeSite):
        for tensor, key in site.projections:
            heads = site.kv_heads if key else site.heads
            ta, tb = (planes_of(x[tensor].double().cpu(), heads, site.kv_heads, site.head_dim)
                      for x in (a, b))  # fmt: skip
            yield torch.einsum("krpiz,lsqiz->klrsipq", ta, tb)  # [.., plane, 2, 2]
        return
    for t in site.tensors:
        for ha, hb, grouped in _by_head(a[t].double().cpu(), b[t].double().cpu(), site, t):
            eq = "okrp,olsq->klrspq" if grouped else "krpz,lsqz->klrspq"
            yield torch.einsum(eq, ha, hb)


def _paired_repeats(m: torch.Tensor, score) -> torch.Tensor:
    """``[kv, kv, *map]``: for each pair of key/value heads, ``m``'s products of their query
    heads (``[kv, kv, r, s, *map]``) summed over the pairing of query heads that scores best,
    each pair of query heads by its own best map."""
    kv, r = m.shape[0], m.shape[2]
    pairs = score(m).reshape(kv * kv, r, r)
    cols = torch.stack([solve_lap(p, maximize=True) for p in pairs]).reshape(kv, kv, r)
    picked = torch.take_along_dim(m, cols.reshape(kv, kv, r, 1, *[1] * (m.ndim - 4)), dim=3)
    return picked.sum((2, 3))


def _procrustes_score(m: torch.Tensor) -> torch.Tensor:
    """The most ``<O, m>`` reaches over orthogonal ``O``, for each ``[..., d, d]`` matrix."""
    return torch.linalg.svdvals(m).sum(-1)


def _rotation_score(m: torch.Tensor) -> torch.Tensor:
    """The most RoPE's plane rotations reach, for each ``[..., planes, 2, 2]``: the most
    ``<R, m>`` reaches over 2-D rotations ``R`` (a plane matrix's ``|m|`` read as a complex
    number), summed over the planes."""
    same, turn = m[..., 0, 0] + m[..., 1, 1], m[..., 1, 0] - m[..., 0, 1]
    return torch.hypot(same, turn).sum(-1)


def _by_head(ta: torch.Tensor, tb: torch.Tensor, site, tensor: str):
    """``tensor``'s heads in A and B, grouped by key/value head: ``(A's, B's, is the output
    projection)``, each ``[kv, r, d, rest]`` (or ``[rest, kv, r, d]`` for the output)."""
    if isinstance(site, ValueSite):
        ha, hb = value_heads(ta, site, tensor), value_heads(tb, site, tensor)
        if tensor == site.out:
            return [(ha, hb, True)]
        return [(ha[:, None], hb[:, None], False)]
    assert isinstance(site, QueryKeySite)
    out = []
    for (ha, _), (hb, _) in zip(site.heads_of(ta, tensor), site.heads_of(tb, tensor)):
        kv = site.kv_heads
        out.append((ha.reshape(kv, -1, *ha.shape[1:]), hb.reshape(kv, -1, *hb.shape[1:]), False))
    return out


def _repeat_scores(a: dict, b: dict, site: Site, order: torch.Tensor) -> list[tuple]:
    """``[r, r]`` per query-side tensor of ``site`` (the query projection's, or the value
    site's output projection), with its rows for :func:`_head_groups`: how far A's query heads
    of repeat ``i`` and B's of repeat ``j`` can agree under their key/value head's map, each
    pair by its own best map, summed over A's key/value heads ``k`` beside B's ``order[k]``."""
    kv, r, d = site.kv_heads, site.heads // site.kv_heads, site.head_dim
    out = []
    if isinstance(site, RopeSite):
        for tensor, key in site.projections:
            if not key:
                ta, tb = (planes_of(x[tensor].double().cpu(), site.heads, kv, d) for x in (a, b))
                m = torch.einsum("krpiz,ksqiz->krsipq", ta, tb[order])
                out.append((_rotation_score(m).sum(0), (tensor, 0, 0, kv, r, d)))
        return out
    if isinstance(site, ValueSite):
        ta, tb = (value_heads(x[site.out].double().cpu(), site, site.out) for x in (a, b))
        m = torch.einsum("okrp,oksq->krspq", ta, tb[:, order])
        return [(_procrustes_score(m).sum(0), (site.out, site.out_axis, 0, kv, r, d))]
    q = site.query
    for tensor in q.tensors:
        ta, tb = (q.view(x[tensor].double().cpu(), tensor).reshape(kv, r, d, -1) for x in (a, b))
        m = torch.einsum("krpz,ksqz->krspq", ta, tb[order])
        axis = q.axis if tensor == q.weight else 0
        out.append((_procrustes_score(m).sum(0), (tensor, axis, q.start, kv, r, d)))
    return out


def _kv_rows(site: Site) -> tuple[str, int, int, int, int, int]:
    """(weight, axis, start, 1, kv_heads, d): the rows of ``site``'s key or value heads."""
    if isinstance(site, RopeSite):
        return site.key, 0, 0, 1, site.kv_heads, site.head_dim
    rows = site.rows if isinstance(site, ValueSite) else site.key
    return rows.weight, rows.axis, rows.start, 1, rows.heads, rows.head_dim


def _head_groups(graph: PermutationGraph, tensor: str, axis: int, start: int, outer: int,
                 heads: int, d: int) -> dict[str, torch.Tensor]:  # fmt: skip
    """The groups that permute whole heads of these rows (``[outer, heads, d]`` from
    ``start``), each with its element per head: constant over ``outer`` and each head's ``d``
    rows, one head per element."""
    out = {}
    for g in graph:
        for m in g.members:
            if (m.tensor, m.axis) != (tensor, axis):
                continue
            block = group_element_map(m.layout, g.name)[start : start + outer * heads * d]
            block = block.reshape(outer, heads, d)
            first = block[0, :, 0]
            if (block == first[None, :, None]).all() and sorted(first.tolist()) == list(
                range(g.size)
            ):
                out[g.name] = first
    return out
