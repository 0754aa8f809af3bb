"""Attention's query and key heads without rotary embeddings: where an orthogonal map of each
key head's dims, applied to the query heads that read it too, keeps every attention score.

The score of query head ``h`` and key head ``j`` (the one it reads) is ``q_h . k_j`` (scaled);
turning both by one orthogonal ``M_j`` (``q -> M_j q``, ``k -> M_j k``) leaves it unchanged. So
the rows of the query projection that make head ``h`` and the key projection's rows of head
``j`` may turn together; permutations move only some of these maps. A :class:`QueryKeySite` is
an attention call whose query and key are each made by one of the patterns of
:mod:`permask.graph.heads` (own or fused projections), read by nothing else on the way (identity
modules allowed: timm's ``q_norm``/``k_norm`` when they are off), the key at most repeated for
grouped-query attention. Rotary embeddings between the projection and the call do not match
the patterns: their planes are :mod:`permask.graph.rope`'s. A norm on the heads, or a query or
key read elsewhere (a cache, a relative-position term), is not a site.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from .attention import attention_sites, readers, unrepeat
from .graph import PermutationGraph
from .heads import HeadRows, head_rows
from .orthogonal import kind_of
from .rules._util import arg

__all__ = ["QueryKeySite", "query_key_sites"]


@dataclass(frozen=True)
class QueryKeySite:
    """One attention call's query rows (``heads`` heads) and key rows (``kv_heads`` heads), both
    of ``head_dim`` dims; ``node`` is the attention call. Its map is ``[kv_heads, d, d]``."""

    query: HeadRows
    key: HeadRows
    node: str

    heads = property(lambda self: self.query.heads, doc="Query heads.")
    kv_heads = property(lambda self: self.key.heads, doc="Key heads.")
    head_dim = property(lambda self: self.key.head_dim, doc="Dims per head.")

    @property
    def name(self) -> str:
        """The key of this site's maps: ``qk:`` and the query weight's name."""
        return f"qk:{self.query.weight}"

    @property
    def tensors(self) -> list[str]:
        """The tensors its maps move (a fused projection's weight once)."""
        return list(dict.fromkeys([*self.query.tensors, *self.key.tensors]))

    def heads_of(self, t: torch.Tensor, tensor: str) -> list[tuple[torch.Tensor, bool]]:
        """``tensor``'s query and key rows by head (``[heads, d, rest]``), each with whether it
        is the key's."""
        return [(rows.view(t, tensor), rows is self.key) for rows in (self.query, self.key)
                if tensor in rows.tensors]  # fmt: skip

    def turn(self, t: torch.Tensor, m: torch.Tensor, tensor: str) -> torch.Tensor:
        """``tensor`` with key head ``j``'s rows, and those of the query heads reading it,
        mapped ``v -> m[j] v``."""
        if tensor in self.query.tensors:
            t = self.query.turn(t, m.repeat_interleave(self.heads // self.kv_heads, 0), tensor)
        if tensor in self.key.tensors:
            t = self.key.turn(t, m, tensor)
        return t


def query_key_sites(graph: PermutationGraph) -> list[QueryKeySite]:
    """Every attention call of ``graph`` whose query and key heads may be turned together."""
    return attention_sites(graph, _site)


def _site(graph: PermutationGraph, sdpa: fx.Node, uses: dict[str, int]) -> QueryKeySite | None:
    q, k = arg(sdpa.args, sdpa.kwargs, 0, "query"), arg(sdpa.args, sdpa.kwargs, 1, "key")
    if not (isinstance(q, fx.Node) and isinstance(k, fx.Node)):
        return None
    operands = [*sdpa.args, *sdpa.kwargs.values()]
    if operands.count(q) != 1 or operands.count(k) != 1:
        return None  # q or k also the value or a mask
    q, k = _made(q), _made(k, repeated=True)
    fq = head_rows(graph, q) if q is not None else None
    fk = head_rows(graph, k) if k is not None else None
    if fq is None or fk is None:
        return None
    (query, _), (key, _) = fq, fk
    if query.head_dim != key.head_dim or query.heads % key.heads:
        return None
    if any(uses.get(t, 0) != 1 for t in {*query.tensors, *key.tensors}):
        return None  # a projection shared with another op
    return QueryKeySite(query, key, sdpa.name)


def _made(x: fx.Node, repeated: bool = False) -> fx.Node | None:
    """The heads under ``x``: identity modules passed, and a key's grouped-query repeat."""
    x = _through_identities(x)
    if repeated and x is not None:
        x = unrepeat(x)
        x = _through_identities(x) if x is not None else None
    return x


def _through_identities(x: fx.Node) -> fx.Node | None:
    while kind_of(x) == "identity":
        if len(readers(x)) != 1:
            return None
        x = x.args[0]
    return x if len(readers(x)) == 1 else None
