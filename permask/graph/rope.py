"""Rotary position embeddings: where a rotation of each frequency plane of q and k keeps the
attention scores, found on the traced graph.

RoPE turns plane ``i`` of a query or key head (dims ``i`` and ``i + d/2`` in the rotate-half
layout of Hugging Face models) by the angle ``theta_i * position``. Two 2-D rotations commute, so
turning plane ``i`` of q and of k by the same angle ``phi`` before RoPE leaves every score
``q_m . k_n`` unchanged. Permutations cannot move these dims (they stay fixed in the graph); a
:class:`RopeSite` records a place where rotations can: an attention call whose query and key
are, exactly,

* ``linear(x, W, b?)`` -> ``view(B, T, heads, d)`` -> ``transpose(1, 2)``, used only by
* ``x * cos + cat(-x[..., d/2:], x[..., :d/2]) * sin`` with the same ``cos`` and ``sin`` for q
  and k, each ``cos``/``sin`` of ``cat(f, f)`` along the last dim (times a scalar at most), so
  that both dims of a plane turn by one angle;
* the key then at most repeated for grouped-query attention (``unsqueeze(2)``, ``expand``,
  ``reshape``: query head ``h`` reads key head ``h // (heads / kv_heads)``), or passed with
  ``enable_gqa``.

Anything else (interleaved or complex RoPE, a key also kept in a cache that the model returns)
is not a site: those dims stay fixed, as for permutations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from .attention import attention_sites, head_dim, head_projection, unrepeat
from .graph import PermutationGraph
from .orthogonal import kind_of, work_dtype
from .rules._util import arg

__all__ = ["RopeSite", "rope_sites", "turn_planes", "planes_of", "plane_rotations"]


@dataclass(frozen=True)
class RopeSite:
    """One attention call's query and key projections (weight, bias or None), ``heads`` query
    heads and ``kv_heads`` key heads of ``head_dim`` dims; ``node`` is the attention call."""

    query: str
    query_bias: str | None
    key: str
    key_bias: str | None
    heads: int
    kv_heads: int
    head_dim: int
    node: str

    @property
    def projections(self) -> list[tuple[str, bool]]:
        """(tensor, is the key's) for the query's and the key's weight and bias."""
        both = ((self.query, False), (self.query_bias, False), (self.key, True),
                (self.key_bias, True))  # fmt: skip
        return [(t, key) for t, key in both if t is not None]

    @property
    def name(self) -> str:
        """The key of this site's rotations: ``rope:`` and the query weight's name."""
        return f"rope:{self.query}"

    @property
    def tensors(self) -> list[str]:
        """The tensors its rotations move."""
        return [t for t, _ in self.projections]

    def turn(self, t: torch.Tensor, r: torch.Tensor, tensor: str) -> torch.Tensor:
        """:func:`turn_planes` of ``tensor``."""
        return turn_planes(t, r, self, tensor in (self.key, self.key_bias))


def rope_sites(graph: PermutationGraph) -> list[RopeSite]:
    """Every attention call of ``graph`` whose q/k frequency planes may be rotated."""
    return attention_sites(graph, _site)


def planes_of(t: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """A q/k projection's weight or bias ``[heads * d, ...]`` as ``[kv_heads, heads / kv_heads,
    2, d / 2, rest]``: the two dims of each frequency plane on axis 2 (a view)."""
    rest = t[0].numel() if t.ndim > 1 else 1
    return t.reshape(kv_heads, heads // kv_heads, 2, head_dim // 2, rest)


def turn_planes(t: torch.Tensor, r: torch.Tensor, site: RopeSite, key: bool) -> torch.Tensor:
    """The q (or, with ``key``, k) projection tensor ``t`` with plane ``i`` of every head read by
    key head ``j`` turned by ``r[j, i]`` (2 x 2), in ``t``'s dtype."""
    heads = site.kv_heads if key else site.heads
    work = work_dtype(t)
    planes = planes_of(t.to(work), heads, site.kv_heads, site.head_dim)
    turned = torch.einsum("kipq,krqiz->krpiz", r.to(device=t.device, dtype=work), planes)
    return turned.reshape(t.shape).to(t.dtype)


def plane_rotations(angle: torch.Tensor) -> torch.Tensor:
    """``[..., 2, 2]`` rotations by ``angle`` (radians)."""
    c, s = torch.cos(angle), torch.sin(angle)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def _site(graph: PermutationGraph, sdpa: fx.Node, uses: dict[str, int]) -> RopeSite | None:
    q, k = arg(sdpa.args, sdpa.kwargs, 0, "query"), arg(sdpa.args, sdpa.kwargs, 1, "key")
    if not (isinstance(q, fx.Node) and isinstance(k, fx.Node)):
        return None
    operands = [*sdpa.args, *sdpa.kwargs.values()]
    if operands.count(q) != 1 or operands.count(k) != 1 or len(k.users) != 1:
        return None  # q or k also the value, or read elsewhere
    k = unrepeat(k)
    rq, rk = _rope(q), _rope(k) if k is not None else None
    if rq is None or rk is None or rq[1:] != rk[1:]:
        return None
    if len(q.users) != 1 or len(k.users) != 1:  # the key kept elsewhere (a cache)
        return None
    pq, pk = head_projection(graph, rq[0]), head_projection(graph, rk[0])
    if pq is None or pk is None or pq[3] != pk[3] or pq[2] % pk[2]:
        return None
    if any(uses.get(t, 0) != 1 for t in (*pq[:2], *pk[:2]) if t is not None):
        return None  # a projection shared with another site or op
    return RopeSite(pq[0], pq[1], pk[0], pk[1], pq[2], pk[2], pq[3], sdpa.name)


def _rope(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """``(x, cos source, sin source)`` when ``node`` is ``x * cos + rotate_half(x) * sin``."""
    if kind_of(node) != "add" or len(node.args) != 2:
        return None
    first, second = node.args
    if kind_of(first) != "mul" or kind_of(second) != "mul":
        return None
    x, cos = first.args
    half, sin = second.args
    if kind_of(half) != "cat" or arg(half.args, half.kwargs, 1, "dim", 0) not in (-1, 3):
        return None
    parts = arg(half.args, half.kwargs, 0, "tensors")
    if len(parts) != 2 or kind_of(parts[0]) != "neg":
        return None
    upper, lower = parts[0].args[0], parts[1]
    d = head_dim(x)
    if d is None or d % 2 or not (_slice(upper, x, d // 2, d) and _slice(lower, x, 0, d // 2)):
        return None
    if set(x.users) != {first, upper, lower}:
        return None
    c, s = _angles(cos, "cos"), _angles(sin, "sin")
    if c is None or s is None or c is not s:
        return None
    return x, c, s


def _angles(node, fn: str) -> fx.Node | None:
    """The ``cat(f, f)`` under ``fn`` (cos or sin), through casts, unsqueezes and scalings."""
    while isinstance(node, fx.Node) and kind_of(node) in ("to", "_to_copy", "unsqueeze", "mul"):
        if kind_of(node) == "mul":
            if sum(isinstance(a, fx.Node) for a in node.args) != 1:
                return None
            node = next(a for a in node.args if isinstance(a, fx.Node))
        else:
            node = node.args[0]
    if not isinstance(node, fx.Node) or kind_of(node) != fn:
        return None
    cat = node.args[0]
    if kind_of(cat) != "cat":
        return None
    parts = arg(cat.args, cat.kwargs, 0, "tensors")
    if len(parts) != 2 or parts[0] is not parts[1]:
        return None
    val = cat.meta.get("val")
    last = (-1,) if val is None else (-1, val.ndim - 1)
    return cat if arg(cat.args, cat.kwargs, 1, "dim", 0) in last else None


def _slice(node, x: fx.Node, start: int, end: int) -> bool:
    if kind_of(node) != "slice" or node.args[0] is not x or node.args[1] not in (3, -1):
        return False
    lo, hi = node.args[2] if len(node.args) > 2 else 0, node.args[3] if len(node.args) > 3 else None
    return lo == start and (hi is None or hi >= end) and (len(node.args) < 5 or node.args[4] == 1)
