"""Each op rule alone and in combination: equivariance plus the structure it must produce."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from equivariance import assert_equivariant, double_eval
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import permask
from permask.graph import Concat, Fixed, GroupAxis, Product


class MLP3d(nn.Module):
    """Linear on a rank-3 input (tokens x channels)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 12), nn.Linear(12, 5)

    def forward(self, x):
        return self.b(F.gelu(self.a(x)))


class Conv1d3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv1d(3, 8, 3), nn.Conv1d(8, 4, 1)
        self.d1, self.d2 = nn.Conv3d(3, 6, 3), nn.Conv3d(6, 4, 1)

    def forward(self, x):
        y = self.c2(F.relu(self.c1(x.flatten(2)))).mean(-1)
        z = self.d2(F.silu(self.d1(x.unsqueeze(2).expand(-1, -1, 3, -1, -1)))).mean((2, 3, 4))
        return y + z


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(3, 16, 1)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.out(F.relu6(self.dw(F.relu(self.bn(self.pw(x))))))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.g = nn.Conv2d(16, 24, 3, padding=1, groups=4)
        self.b = nn.Conv2d(24, 4, 1)

    def forward(self, x):
        return self.b(F.relu(self.g(F.relu(self.a(x)))))


class GroupNormNet(nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.a, self.gn, self.b = nn.Conv2d(3, 16, 1), nn.GroupNorm(groups, 16), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.b(F.relu(self.gn(self.a(x))))


class ChannelsLast(nn.Module):
    """ConvNeXt-style: NHWC LayerNorm + Linear between permutes, layer scale, residual."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.norm = nn.LayerNorm(8)
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 8)
        self.gamma = nn.Parameter(torch.rand(8) + 0.5)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        y = x.permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(self.norm(y)))) * self.gamma
        return self.head(x + y.permute(0, 3, 1, 2))


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.se1, self.se2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.scale = nn.Parameter(torch.rand(16, 1, 1) + 0.5)
        self.b = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = F.relu(self.a(x))
        s = x.mean((2, 3), keepdim=True)
        s = torch.sigmoid(self.se2(F.relu(self.se1(s))))
        spatial = torch.sigmoid(x.mean(1, keepdim=True))  # CBAM-like spatial gate
        return self.b(x * s * spatial * self.scale - x / 3)


class CatSplit(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 10, 1)
        self.c = nn.Conv2d(16, 12, 1)
        self.d, self.e = nn.Conv2d(4, 3, 1), nn.Conv2d(8, 3, 1)

    def forward(self, x):
        y = F.relu(self.c(torch.cat([self.a(x), self.b(x)], dim=1)))
        p, q = torch.split(y, [4, 8], dim=1)
        r, s = y.chunk(2, dim=1)
        return self.d(p) + self.e(q) + (r - s).sum(1, keepdim=True)


class SliceTail(nn.Module):
    """GhostNet-style: concat of two branches then slice off a tail."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.cheap = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.b = nn.Conv2d(9, 4, 1)

    def forward(self, x):
        y = F.relu(self.a(x))
        z = torch.cat([y, self.cheap(y)], dim=1)
        return self.b(z[:, :9])


class FlattenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(F.relu(self.conv(x))), 1))


class ReshapeHeads(nn.Module):
    """Reshape channels into (heads, dim), transpose, matmul, and back."""

    def __init__(self):
        super().__init__()
        self.q, self.v = nn.Linear(6, 8), nn.Linear(6, 8)
        self.proj = nn.Linear(8, 3)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).reshape(b, n, 2, 4).transpose(1, 2)
        v = self.v(x).view(b, n, 2, 4).permute(0, 2, 1, 3)
        attn = (q @ q.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, 8))


class FusedQKV(nn.Module):
    """timm-style fused qkv: reshape (B, N, 3, H, D), permute, then unbind / [i] / an extra use.

    ``take``: "unbind" or "index" take the items apart; "extra" also uses the stacked tensor as a
    whole (so the items must stay tied); "rope" rotates q and k along head_dim (fixes their order).
    """

    def __init__(self, take: str):
        super().__init__()
        self.take = take
        self.qkv, self.proj = nn.Linear(6, 3 * 2 * 4), nn.Linear(8, 3)

    def forward(self, x):
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, 2, 4).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0) if self.take != "index" else (qkv[0], qkv[1], qkv[2])
        if self.take == "rope":  # rotate pairs of head_dim by angles that differ per dim
            ang = torch.arange(4, dtype=x.dtype, device=x.device) * 0.3
            q, k = (
                t * ang.cos() + torch.cat([-t[..., 2:], t[..., :2]], -1) * ang.sin() for t in (q, k)
            )
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, 8)
        out = self.proj(y)
        return out + qkv.mean((0, 2, 3, 4))[:, None, None] if self.take == "extra" else out


class TorchMHA(nn.Module):
    """nn.MultiheadAttention (batch first) between two Linears, its weights used too."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 12)
        self.mha = nn.MultiheadAttention(12, 3, batch_first=True)
        self.out = nn.Linear(12, 2)

    def forward(self, x):
        h = self.inp(x)
        y, w = self.mha(h, h, h)
        return self.out(F.gelu(y + h)) + w.sum(-1, keepdim=True)


class PoolResize(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)
        self.drop, self.ident = nn.Dropout(0.5), nn.Identity()

    def forward(self, x):
        y = F.avg_pool2d(F.relu(self.a(x)), 2)
        y = F.interpolate(y, scale_factor=2.0, mode="nearest")
        y = F.adaptive_max_pool2d(self.ident(self.drop(y)), 2)
        return self.b(F.pad(y, (1, 1, 1, 1)))


class SharedAndInplace(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.shared, self.b = nn.Linear(5, 7), nn.Linear(7, 7), nn.Linear(7, 3)

    def forward(self, x):
        y = F.relu(self.a(x), inplace=True)
        z = self.shared(y)
        z += self.shared(torch.tanh(z))
        z = torch.cat([y[:, :2] * 2, z[:, 2:]], dim=1)
        return self.b(z)


class EmbedEinsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.w = nn.Parameter(torch.randn(6, 9))
        self.out = nn.Linear(9, 2)

    def forward(self, idx):
        h = torch.einsum("btc,cd->btd", self.emb(idx), self.w)
        return self.out(F.relu(h)).mean(1)


class ChannelConv(nn.Module):
    """ECA: a Conv1d slides along the channel axis, so channel order matters there."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1), nn.Conv2d(4, 2, 1)
        self.eca, self.head = nn.Conv1d(1, 1, 3, padding=1), nn.Linear(8, 2)

    def forward(self, x):
        y = F.relu(self.a(x))
        w = self.eca(y.mean((2, 3)).unsqueeze(1)).squeeze(1)  # (B, C) mixed along C
        return self.c(F.relu(self.b(y))).mean((2, 3)) + self.head(w)


class Unknown(nn.Module):
    """cumsum along channels has no rule: what it touches must freeze."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.cumsum(F.relu(self.a(x)), dim=1)
        return self.c(F.relu(self.b(y)))


class Roll(nn.Module):
    """Swin-style shift: roll over positions is fine, roll over channels freezes them."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.roll(F.relu(self.a(x)), shifts=(1, 2), dims=(2, 3))
        return self.c(torch.roll(F.relu(self.b(y)), 1, dims=1))


IMG = (2, 3, 8, 8)


class TopK(nn.Module):
    """Top-k of a layer's outputs: the values alone do not depend on where the units sit; the
    indices are their positions, read as numbers (``arith``) or as an index (``index``)."""

    def __init__(self, read: str):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(2, 3)
        self.table = nn.Parameter(torch.randn(8, 3))
        self.read = read

    def forward(self, x):
        values, indices = self.a(x).topk(2, dim=-1)
        y = self.b(F.relu(values))
        if self.read == "arith":
            return y + indices.to(y.dtype).sum(-1, keepdim=True)
        if self.read == "index":
            return y + self.table[indices].sum(-2)
        if self.read == "max":  # the largest value: wherever it sits
            return y + self.a(x).max(-1, keepdim=True).values
        if self.read == "argmax":  # its position, read as a number
            return y + self.a(x).argmax(-1, keepdim=True).to(y.dtype)
        return y


CASES = {
    "linear_rank3": (MLP3d, (2, 4, 6)),
    "conv1d_conv3d": (Conv1d3d, IMG),
    "depthwise": (Depthwise, IMG),
    "grouped": (Grouped, IMG),
    "groupnorm4": (lambda: GroupNormNet(4), IMG),
    "groupnorm1": (lambda: GroupNormNet(1), IMG),
    "channels_last": (ChannelsLast, IMG),
    "squeeze_excite": (SqueezeExcite, IMG),
    "cat_split": (CatSplit, IMG),
    "slice_tail": (SliceTail, IMG),
    "flatten_linear": (FlattenLinear, IMG),
    "reshape_heads": (ReshapeHeads, (2, 5, 6)),
    "pool_resize": (PoolResize, IMG),
    "torch_mha": (TorchMHA, (2, 4, 5)),
    "fused_qkv_unbind": (lambda: FusedQKV("unbind"), (2, 5, 6)),
    "fused_qkv_index": (lambda: FusedQKV("index"), (2, 5, 6)),
    "fused_qkv_extra_use": (lambda: FusedQKV("extra"), (2, 5, 6)),
    "fused_qkv_rope": (lambda: FusedQKV("rope"), (2, 5, 6)),
    "shared_inplace": (SharedAndInplace, (3, 5)),
    "embed_einsum": (EmbedEinsum, None),
    "channel_conv": (ChannelConv, IMG),
    "unknown": (Unknown, IMG),
    "roll": (Roll, IMG),
    "topk_values": (lambda: TopK("none"), (3, 6)),
    "topk_indices_arith": (lambda: TopK("arith"), (3, 6)),
    "topk_indices_index": (lambda: TopK("index"), (3, 6)),
    "max_values": (lambda: TopK("max"), (3, 6)),
    "argmax_indices": (lambda: TopK("argmax"), (3, 6)),
}


def build(name):
    make, shape = CASES[name]
    model = double_eval(make())
    g = torch.Generator().manual_seed(1)
    if shape is None:
        x = torch.randint(0, 10, (2, 5), generator=g)
    else:
        x = torch.randn(*shape, dtype=torch.float64, generator=g)
    return model, x, permask.trace(model, x)


@pytest.mark.parametrize("name", list(CASES))
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**31 - 1))
def test_rule_is_equivariant(name, seed):
    model, x, graph = build(name)
    assert_equivariant(model, x, graph, seed, tol=1e-10)


def members(graph) -> dict[str, set[str]]:
    """Group name -> its members as "tensor:axis"."""
    return {grp.name: {f"{m.tensor}:{m.axis}" for m in grp.members} for grp in graph}


def test_linear_rank3_groups():
    _, _, g = build("linear_rank3")
    assert [grp.size for grp in g] == [12]
    assert g.tensors["a.weight"] == [GroupAxis("a.weight:0", 12), Fixed(6)]


def test_conv1d_conv3d_hidden_channels_are_groups():
    _, _, g = build("conv1d_conv3d")
    assert members(g) == {
        "c1.weight:0": {"c1.weight:0", "c1.bias:0", "c2.weight:1"},
        "d1.weight:0": {"d1.weight:0", "d1.bias:0", "d2.weight:1"},
    }
    assert [grp.size for grp in g] == [8, 6]
    assert g.tensors["c1.weight"] == [GroupAxis("c1.weight:0", 8), Fixed(3), Fixed(3)]
    assert g.tensors["c2.weight"] == [Fixed(4), GroupAxis("c1.weight:0", 8), Fixed(1)]
    d1 = GroupAxis("d1.weight:0", 6)
    assert g.tensors["d1.weight"] == [d1, Fixed(3), Fixed(3), Fixed(3), Fixed(3)]
    assert g.tensors["d2.weight"] == [Fixed(4), d1, Fixed(1), Fixed(1), Fixed(1)]


def test_depthwise_couples_input_and_output():
    _, _, g = build("depthwise")
    (grp,) = list(g)
    assert grp.size == 16
    assert {"pw.weight", "bn.running_mean", "dw.weight", "dw.bias", "out.weight"} <= set(
        grp.tensors
    )


def test_grouped_conv_has_block_structure():
    _, _, g = build("grouped")
    a = g.tensors["a.weight"][0]
    assert isinstance(a, Product) and [f.size for f in a.factors] == [4, 4]
    gw = g.tensors["g.weight"]
    assert isinstance(gw[0], Product) and [f.size for f in gw[0].factors] == [4, 6]
    assert gw[0].factors[0] == a.factors[0]  # blocks shared by input and output
    assert gw[1] == a.factors[1]  # within-block input channels


@pytest.mark.parametrize("groups, factors", [(4, [4, 4]), (1, None)])
def test_groupnorm_blocks(groups, factors):
    _, _, g = build(f"groupnorm{groups}")
    lay = g.tensors["gn.weight"][0]
    if factors is None:
        assert isinstance(lay, GroupAxis) and lay.size == 16
    else:
        assert isinstance(lay, Product) and [f.size for f in lay.factors] == factors


def test_channels_last_stream_includes_layer_scale_and_norm():
    _, _, g = build("channels_last")
    stream = g.groups["stem.weight:0"]
    assert {"gamma", "norm.weight", "fc2.weight", "fc1.weight", "head.weight"} <= set(
        stream.tensors
    )


def test_squeeze_excite_hidden_is_own_group():
    _, _, g = build("squeeze_excite")
    assert sorted(grp.size for grp in g) == [4, 16]
    assert "scale" in g.groups["a.weight:0"].tensors


def test_cat_gives_segments_and_split_refines():
    _, _, g = build("cat_split")
    c_in = g.tensors["c.weight"][1]
    assert isinstance(c_in, Concat) and [p.size for p in c_in.parts] == [6, 10]
    c_out = g.tensors["c.weight"][0]
    # split at 4 and halves tied by (r - s): [a | b | a | b] with a, b of sizes 4, 2
    assert isinstance(c_out, Concat) and [p.size for p in c_out.parts] == [4, 2, 4, 2]
    assert c_out.parts[0] == c_out.parts[2] and c_out.parts[1] == c_out.parts[3]


def test_slice_tail_keeps_head_free():
    _, _, g = build("slice_tail")
    b_in = g.tensors["b.weight"][1]
    # the depthwise branch repeats y's group: [y | y][:9] cuts y into halves -> [h1 | h2 | h1]
    assert isinstance(b_in, Concat) and [p.size for p in b_in.parts] == [3, 3, 3]
    assert b_in.parts[0] == b_in.parts[2] != b_in.parts[1]


def test_flatten_into_linear_is_a_strided_product():
    _, _, g = build("flatten_linear")
    fc_in = g.tensors["fc.weight"][1]
    assert fc_in == Product((GroupAxis("conv.weight:0", 8), Fixed(16)))


def test_reshape_into_heads_factors_channels():
    _, _, g = build("reshape_heads")
    q = g.tensors["q.weight"][0]
    assert isinstance(q, Product) and [f.size for f in q.factors] == [2, 4]


def test_torch_mha_heads_and_separate_value_dim():
    _, _, g = build("torch_mha")
    w = g.tensors["mha.in_proj_weight"][0]
    assert isinstance(w, Concat) and [p.size for p in w.parts] == [12, 12, 12]
    q, k, v = w.parts
    assert q == k and q != v  # q and k share within-head order, v has its own
    assert q.factors[0] == v.factors[0] and q.factors[0].size == 3  # heads shared


def test_pool_resize_dropout_pad_keep_channels_free():
    _, _, g = build("pool_resize")  # pools, interpolate, dropout, identity, pad: channel-wise
    assert members(g) == {"a.weight:0": {"a.weight:0", "a.bias:0", "b.weight:1"}}
    a = GroupAxis("a.weight:0", 8)
    assert g.tensors["a.weight"] == [a, Fixed(3), Fixed(3), Fixed(3)]
    assert g.tensors["b.weight"] == [Fixed(4), a, Fixed(1), Fixed(1)]


@pytest.mark.parametrize("name", ["fused_qkv_unbind", "fused_qkv_index"])
def test_fused_qkv_items_get_their_own_head_dims(name):
    _, _, g = build(name)
    q, k, v = g.tensors["qkv.weight"][0].parts  # three segments of the fused Linear's output
    assert q.factors == k.factors and q.factors[0] == v.factors[0]  # heads shared; q, k tied
    assert isinstance(v.factors[1], GroupAxis) and v.factors[1] != q.factors[1]
    assert g.tensors["proj.weight"][1] == v  # the projection reads heads x v's head_dim


def test_fused_qkv_used_whole_stays_one_product():
    _, _, g = build("fused_qkv_extra_use")  # the stacked tensor is also used as a whole
    w = g.tensors["qkv.weight"][0]
    assert isinstance(w, Product) and isinstance(w.factors[0], Fixed)  # 3 x heads x head_dim


def test_fused_qkv_rope_fixes_q_and_k_head_dims_only():
    _, _, g = build("fused_qkv_rope")
    q, k, v = g.tensors["qkv.weight"][0].parts
    assert isinstance(q.factors[1], Fixed) and isinstance(k.factors[1], Fixed)
    assert isinstance(v.factors[1], GroupAxis) and isinstance(v.factors[0], GroupAxis)


def test_shared_inplace_ties_reused_layer_and_slice_splits():
    _, _, g = build("shared_inplace")
    # shared reads y and its own output: both its axes follow y's channels; the cat of y[:, :2]
    # and z[:, 2:] cuts that group at 2 -> two groups, each moving every tensor on the stream
    head, tail = GroupAxis("a.weight:0[0:2]", 2), GroupAxis("a.weight:0[2:7]", 5)
    stream = {"a.weight:0", "a.bias:0", "shared.weight:0", "shared.weight:1", "shared.bias:0"}
    assert members(g) == {head.group: stream | {"b.weight:1"}, tail.group: stream | {"b.weight:1"}}
    split = Concat((head, tail))
    assert g.tensors["a.weight"] == [split, Fixed(5)]
    assert g.tensors["shared.weight"] == [split, split]
    assert g.tensors["shared.bias"] == [split]
    assert g.tensors["b.weight"] == [Fixed(3), split]


def test_embedding_rows_fixed():
    _, _, g = build("embed_einsum")
    assert isinstance(g.tensors["emb.weight"][0], Fixed)
    assert isinstance(g.tensors["emb.weight"][1], GroupAxis)


def test_conv_along_channels_freezes_them():
    _, _, g = build("channel_conv")
    assert isinstance(g.tensors["a.weight"][0], Fixed)
    reasons = {r.message for f in g.frozen if f.name == "a.weight" for r in f.reasons}
    assert "a conv kernel slides over this axis" in reasons
    assert [grp.size for grp in g] == [4]  # b's output stays free


def test_roll_freezes_only_rolled_axes():
    _, _, g = build("roll")
    assert isinstance(g.tensors["a.weight"][0], GroupAxis)  # rolled over positions only
    assert isinstance(g.tensors["b.weight"][0], Fixed)  # rolled over channels


def test_unknown_op_freezes_what_it_touches():
    _, _, g = build("unknown")
    assert isinstance(g.tensors["a.weight"][0], Fixed)  # feeds roll: frozen
    assert isinstance(g.tensors["b.weight"][1], Fixed)  # fed by roll: frozen
    assert isinstance(g.tensors["b.weight"][0], GroupAxis)  # the next layer is free again
    reasons = [r.message for f in g.frozen for r in f.reasons if f.name == "a.weight"]
    assert any("no rule" in m for m in reasons)


def test_topk_values_leave_the_axis_free_and_its_indices_freeze_it():
    for name in ("topk_values", "max_values"):
        _, _, g = build(name)
        assert isinstance(g.tensors["a.weight"][0], GroupAxis), name
    for name in ("topk_indices_arith", "topk_indices_index", "argmax_indices"):
        _, _, g = build(name)
        assert isinstance(g.tensors["a.weight"][0], Fixed)
        reasons = {r.message for f in g.frozen if f.name == "a.weight" for r in f.reasons}
        assert any("top-k indices" in m for m in reasons), reasons
