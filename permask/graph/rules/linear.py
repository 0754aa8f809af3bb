"""Contractions: einsum, matmul, Linear, embedding.

An einsum is equivariant under any permutation applied to every axis that carries the same
index letter, so all axes of one letter are unified (size-1 broadcast axes excepted). Linear
and matmul are einsums; an embedding's vocabulary axis is addressed by value and stays fixed.
"""

from __future__ import annotations

import operator
import string

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..context import RuleContext
from ..registry import Decline, TracedTensor, register_rule
from ._util import size_one


def contract(
    ctx: RuleContext, operands: list[TracedTensor], subscripts: list[str], output: str
) -> list:
    """Unify axes by einsum letter; return the output layouts."""
    by_letter: dict[str, object] = {}
    for t, sub in zip(operands, subscripts):
        if len(sub) != t.ndim:
            raise Decline(f"einsum subscript '{sub}' for a tensor of rank {t.ndim}")
        for letter, ax, s in zip(sub, t.axes, t.shape):
            if s == 1:
                continue
            if letter in by_letter:
                ctx.unify(by_letter[letter], ax)
            else:
                by_letter[letter] = ax
    return [by_letter.get(c) or size_one(ctx) for c in output]


def _expand_ellipsis(subs: list[str], operands: list[TracedTensor], output: str | None):
    free = [c for c in string.ascii_letters if c not in "".join(subs) + (output or "")]
    width = max((t.ndim - len(s.replace("...", "")) for s, t in zip(subs, operands)), default=0)
    fill = "".join(free[:width])
    out_subs = []
    for s, t in zip(subs, operands):
        if "..." in s:
            k = t.ndim - len(s.replace("...", ""))
            s = s.replace("...", fill[width - k :])
        out_subs.append(s)
    if output is not None and "..." in output:
        output = output.replace("...", fill)
    return out_subs, output


@register_rule(torch.einsum)
def einsum(ctx: RuleContext, equation: str, *operands):
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    eq = equation.replace(" ", "")
    lhs, _, rhs = eq.partition("->")
    subs = lhs.split(",")
    output = rhs if "->" in eq else None
    subs, output = _expand_ellipsis(subs, list(operands), output)
    if output is None:
        letters = "".join(subs)
        output = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    return contract(ctx, list(operands), subs, output)


def _batch_letters(n: int) -> str:
    return string.ascii_letters[:n]


@register_rule(operator.matmul, torch.matmul, torch.mm, torch.bmm, "matmul", "mm", "bmm")
def matmul(ctx: RuleContext, a: TracedTensor, b: TracedTensor):
    if a.ndim < 1 or b.ndim < 1:
        raise Decline("matmul of a scalar")
    # letters: x=rows of a, y=contracted, z=cols of b; batch letters broadcast from the right.
    batch = max(a.ndim, b.ndim) - 2
    bl = _batch_letters(max(batch, 0))
    sa = "y" if a.ndim == 1 else bl[len(bl) - (a.ndim - 2) :] + "xy"
    sb = "y" if b.ndim == 1 else bl[len(bl) - (b.ndim - 2) :] + "yz"
    out = bl + ("x" if a.ndim > 1 else "") + ("z" if b.ndim > 1 else "")
    return contract(ctx, [a, b], [sa, sb], out)


def _linear(ctx: RuleContext, x: TracedTensor, w: TracedTensor, b: TracedTensor | None):
    lead = _batch_letters(x.ndim - 1)
    out = contract(ctx, [x, w], [lead + "y", "zy"], lead + "z")
    if b is not None:
        ctx.unify(b.axes[0], w.axes[0])
    return out


@register_rule(F.linear)
def linear(
    ctx: RuleContext, input: TracedTensor, weight: TracedTensor, bias: TracedTensor | None = None
):
    return _linear(ctx, input, weight, bias)


@register_rule(nn.Linear)
def linear_module(ctx: RuleContext, x: TracedTensor):
    return _linear(ctx, x, ctx.tensor("weight"), ctx.tensor("bias"))


def _embedding(ctx: RuleContext, idx: TracedTensor, weight: TracedTensor):
    ctx.freeze(weight.axes[0], "embedding rows are addressed by value")
    return [*idx.axes, weight.axes[1]]


@register_rule(F.embedding)
def embedding(ctx: RuleContext, input: TracedTensor, weight: TracedTensor, *args, **kwargs):
    return _embedding(ctx, input, weight)


@register_rule(nn.Embedding)
def embedding_module(ctx: RuleContext, x: TracedTensor):
    return _embedding(ctx, x, ctx.tensor("weight"))


@register_rule(F.scaled_dot_product_attention)
def scaled_dot_product_attention(ctx: RuleContext, query: TracedTensor, key: TracedTensor,
                                 value: TracedTensor, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False):  # fmt: skip
    """softmax(q k^T * scale + mask) v: an einsum over (L, E) x (S, E) then (L, S) x (S, Ev).

    The default scale depends only on E's size, so any permutation shared by q's and k's
    last axes is free, as is one of v's last axis; keys and values share the S axis.
    """
    if enable_gqa or is_causal:
        if enable_gqa:
            raise Decline("grouped-query attention repeats heads")
        # a causal mask fixes the order of positions
        ctx.freeze(query.axes[-2], "causal attention positions")
        ctx.freeze(key.axes[-2], "causal attention positions")
    batch = max(query.ndim, key.ndim, value.ndim) - 2
    bl = _batch_letters(batch)
    subs = [
        bl[batch - (t.ndim - 2) :] + tail for t, tail in ((query, "le"), (key, "se"), (value, "sv"))
    ]
    operands = [query, key, value]
    if isinstance(attn_mask, TracedTensor):
        subs.append(bl[batch - (attn_mask.ndim - 2) :] + "ls")
        operands.append(attn_mask)
    return contract(ctx, operands, subs, bl + "lv")


@register_rule(nn.MultiheadAttention)
def multihead_attention(ctx: RuleContext, query: TracedTensor, key: TracedTensor,
                        value: TracedTensor, key_padding_mask=None, need_weights=True,
                        attn_mask=None, average_attn_weights=True,
                        is_causal=False):  # fmt: skip
    """Heads are shared by q, k, v and the output projection's input; q and k share a
    within-head permutation, v (and the output projection's input) has its own."""
    m = ctx.module
    if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
        raise Decline("MultiheadAttention with separate q/k/v dims, bias_k/v or zero attention")
    if isinstance(key_padding_mask, TracedTensor) or is_causal:
        raise Decline("MultiheadAttention with a key padding mask or causal flag")
    heads, dim = m.num_heads, m.head_dim
    h = ctx.new(heads, f"{ctx.label}.heads")
    qk, v = ctx.new(dim, f"{ctx.label}.qk_dim"), ctx.new(dim, f"{ctx.label}.v_dim")
    w = ctx.tensor("in_proj_weight")
    proj = ctx.concat([ctx.product([h, qk]), ctx.product([h, qk]), ctx.product([h, v])])
    ctx.unify(w.axes[0], proj)
    b = ctx.tensor("in_proj_bias")
    if b is not None:
        ctx.unify(b.axes[0], w.axes[0])
    for t in (query, key, value):
        ctx.unify(t.axes[-1], w.axes[1])
    out_w, out_b = ctx.tensor("weight", m.out_proj), ctx.tensor("bias", m.out_proj)
    ctx.unify(out_w.axes[1], ctx.product([h, v]))
    if out_b is not None:
        ctx.unify(out_b.axes[0], out_w.axes[0])
    # (L, N, E) or (N, L, E): sequence and batch axes
    seq, bat = (1, 0) if m.batch_first and query.ndim == 3 else (0, 1)
    ctx.unify(key.axes[seq], value.axes[seq])
    if query.ndim == 3:
        ctx.unify(query.axes[bat], key.axes[bat])
        ctx.unify(key.axes[bat], value.axes[bat])
    if isinstance(attn_mask, TracedTensor):
        if attn_mask.ndim != 2:
            raise Decline("per-head attention masks")
        ctx.unify(attn_mask.axes[0], query.axes[seq])
        ctx.unify(attn_mask.axes[1], key.axes[seq])
    out = [*query.axes[:-1], out_w.axes[0]]
    if not isinstance(ctx.out, tuple):
        return out
    weights = ctx.out[1]
    if weights is None:
        return (out, None)
    lead = [query.axes[bat]] if query.ndim == 3 else []
    mid = [] if average_attn_weights else [h]
    return (out, [*lead, *mid, query.axes[seq], key.axes[seq]])
