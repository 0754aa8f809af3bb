"""The torch.export front end: the same groups as symbolic tracing where both capture a model,
random permutations leave outputs unchanged (float64), keyword inputs, the fx -> export
fallback, RMSNorm's mean of squares, and alignment on exported graphs."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torch.nn as nn
import torchvision
from equivariance import double_eval

import permask
from permask.models import resnet20
from permask.testing import equivalence_error, perturb_


def _groups(graph: permask.PermutationGraph) -> list:
    """Groups as (size, sorted members): equal graphs up to the groups' names."""
    return sorted((g.size, sorted((m.tensor, m.axis) for m in g.members)) for g in graph)


def _both(model: nn.Module, x: torch.Tensor):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no op of these models may lack an ATen rule
        return permask.trace(model, x, frontend="fx"), permask.trace(model, x, frontend="export")


MODELS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.GELU(),
                                  nn.Dropout(), nn.Linear(16, 3)), (4, 8)),
    "resnet20": (lambda: resnet20(1), (2, 3, 32, 32)),
    "tv_resnet18": (torchvision.models.resnet18, (2, 3, 32, 32)),
    "tv_mobilenet_v3_small": (torchvision.models.mobilenet_v3_small, (2, 3, 32, 32)),
    "timm_convnext_atto": (lambda: timm.create_model("convnext_atto", num_classes=10),
                           (2, 3, 32, 32)),
    "timm_vit_tiny": (lambda: timm.create_model("vit_tiny_patch16_224", num_classes=10,
                                                img_size=32, depth=2), (2, 3, 32, 32)),
    "timm_regnetx_002": (lambda: timm.create_model("regnetx_002", num_classes=10), (2, 3, 32, 32)),
    # q, k, v = qkv[0], qkv[1], qkv[2] of a stacked tensor: aten.select must keep items apart
    "timm_cait_xxs24": (lambda: timm.create_model("cait_xxs24_224", num_classes=10, img_size=32,
                                                  depth=2), (2, 3, 32, 32)),
}  # fmt: skip


@pytest.mark.parametrize("name", list(MODELS))
def test_export_gives_the_fx_groups_and_keeps_outputs(name):
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = double_eval(perturb_(make().eval(), seed=0))
    x = torch.randn(shape, dtype=torch.float64)
    fx_graph, ex_graph = _both(model, x)
    assert ex_graph.frontend == "export" and fx_graph.frontend == "fx"
    assert _groups(ex_graph) == _groups(fx_graph)
    for seed in range(3):
        pi = permask.random_permutation(ex_graph, torch.Generator().manual_seed(seed))
        assert equivalence_error(model, x, pi, ex_graph) < 1e-12


class _KeywordNet(nn.Module):
    """A forward that takes keyword inputs and branches on them (``mask=None``)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        h = h + self.fc2(torch.relu(self.fc1(h)))
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        return self.head(h.mean(1))


def test_keyword_inputs_go_to_export_and_permute_exactly():
    model = double_eval(_KeywordNet())
    ids = torch.randint(0, 50, (2, 7))
    graph = permask.trace(model, {"input_ids": ids, "attention_mask": torch.ones(2, 7)})
    assert graph.frontend == "export" and "captured by torch.export" in str(graph)
    assert {g.size for g in graph} == {16, 32}  # residual stream and the MLP hidden
    pi = permask.random_permutation(graph, torch.Generator().manual_seed(0))
    moved = permask.permute_model(model, pi, graph)
    mask = torch.rand(2, 7, dtype=torch.float64)
    torch.testing.assert_close(moved(ids, mask), model(ids, mask), rtol=1e-12, atol=1e-12)
    with pytest.raises(permask.TraceError, match="keyword example inputs need frontend='export'"):
        permask.trace(model, {"input_ids": ids}, frontend="fx")


class _ShapeBranch(nn.Module):
    """Python control flow on a shape: symbolic tracing fails, torch.export captures it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 12), nn.Linear(12, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if h.shape[0] > 1:
            h = h * 2
        return self.fc2(h)


def test_auto_falls_back_to_export_when_fx_cannot_trace():
    model = double_eval(_ShapeBranch())
    x = torch.randn(3, 6, dtype=torch.float64)
    with pytest.raises(permask.TraceError):
        permask.trace(model, x, frontend="fx")
    graph = permask.trace(model, x)
    assert graph.frontend == "export" and [g.size for g in graph] == [12]
    pi = permask.random_permutation(graph, torch.Generator().manual_seed(0))
    assert equivalence_error(model, x, pi, graph) < 1e-12
    with pytest.raises(ValueError, match="unknown frontend 'onnx'"):
        permask.trace(model, x, frontend="onnx")


class _ValueBranch(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


def test_when_both_front_ends_fail_the_error_gives_both_reasons():
    with pytest.raises(permask.TraceError) as err:
        permask.trace(_ValueBranch(), torch.randn(2, 3))
    msg = str(err.value)
    assert "torch.export could not capture _ValueBranch" in msg and "Falling back" in msg


class _RMSNormMLP(nn.Module):
    """Llama's RMSNorm written out (mean of squares over the permuted axis), a gated MLP."""

    def __init__(self, d: int = 16, hidden: int = 24) -> None:
        super().__init__()
        self.inp = nn.Linear(5, d)
        self.norm_w = nn.Parameter(torch.ones(d))
        self.gate, self.up = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)
        self.out = nn.Linear(d, 3)

    def forward(self, x):
        h = self.inp(x)
        n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.norm_w
        h = h + self.down(nn.functional.silu(self.gate(n)) * self.up(n))
        return self.out(h)


def test_rmsnorm_reduction_is_invariant_and_the_gated_mlp_moves_together():
    model = double_eval(perturb_(_RMSNormMLP(), seed=0))
    x = torch.randn(4, 5, dtype=torch.float64)
    graph = permask.trace(model, x, frontend="export")
    assert sorted(g.size for g in graph) == [16, 24] and not graph.unruled_ops
    hidden = next(g for g in graph if g.size == 24)
    assert {(m.tensor, m.axis) for m in hidden.members} == {
        ("gate.weight", 0),
        ("up.weight", 0),
        ("down.weight", 1),
    }
    pi = permask.random_permutation(graph, torch.Generator().manual_seed(0))
    assert equivalence_error(model, x, pi, graph) < 1e-12


@pytest.mark.parametrize("method", ["activation", "weight"])
def test_alignment_on_an_exported_graph_recovers_a_planted_permutation(method):
    torch.manual_seed(0)
    a = perturb_(resnet20(1).eval(), seed=0)
    graph = permask.trace(a, torch.randn(2, 3, 32, 32), frontend="export")
    pi = permask.random_permutation(graph, torch.Generator().manual_seed(1))
    b = permask.permute_model(a, pi, graph)
    data = [torch.randn(32, 3, 32, 32) for _ in range(2)]
    got = permask.align(a, b, data, graph=graph, method=method)
    assert all(torch.equal(got[k], pi[k]) for k in pi)


class _PoolAtTokens(nn.Module):
    """CLIP's text pooling: ``hidden[arange(B), ids.argmax(-1)]`` (two index tensors), and a
    zeros accumulator (a constant: free) plus a position ramp (arange: fixed)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x, ids):
        h = torch.relu(self.a(x))
        pooled = h[torch.arange(h.shape[0]), ids.argmax(-1)] + torch.zeros(16, dtype=x.dtype)
        return self.b(pooled) + torch.arange(3, dtype=x.dtype)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_several_index_tensors_and_constants_keep_the_hidden_units_free(frontend):
    model = double_eval(_PoolAtTokens())
    x, ids = torch.randn(4, 5, 6, dtype=torch.float64), torch.randint(0, 9, (4, 5))
    graph = permask.trace(model, (x, ids), frontend=frontend)
    assert [g.size for g in graph] == [16] and not graph.unruled_ops
    pi = permask.random_permutation(graph, torch.Generator().manual_seed(0))
    assert equivalence_error(model, (x, ids), pi, graph) < 1e-12


class _OpsByShape(nn.Module):
    """A forward whose ops depend on the batch's shape (export specialises on it)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(torch.relu(h) if x.shape[0] > 4 else torch.tanh(h))


def test_batches_of_another_shape_are_captured_again_or_refused_by_name():
    """Activation matching on an export graph: a batch of another shape is captured again and
    feeds the same statistics when its graph has the same observation points; where the shape
    changes the ops at a point, a ValueError names the point and says to pad or bucket."""
    a = _OpsByShape()
    graph = permask.trace(a, {"x": torch.randn(6, 4)})
    assert graph.frontend == "export"
    pi = permask.random_permutation(graph, torch.Generator().manual_seed(0))
    b = permask.permute_model(a, pi, graph)
    g = torch.Generator().manual_seed(1)
    same_ops = [{"x": torch.randn(n, 4, generator=g)} for n in (6, 9, 6, 12)]
    assert permask.align(a, b, same_ops, graph=graph) == pi
    other_ops = [{"x": torch.randn(3, 4, generator=g)}]
    with pytest.raises(ValueError, match="different exported graph at observation point 'relu'"):
        permask.align(a, b, other_ops, graph=graph)


class _SlicedKey(nn.Module):
    """Multi-head latent attention's key: a fresh buffer filled by ``copy_`` into slices (each
    head's own part, then a part shared by all heads). ``partial`` copies only the first part
    into zeros, which is no ``cat``: the rewrite must leave it alone."""

    def __init__(self, partial: bool = False, heads: int = 3, own: int = 4, shared: int = 2):
        super().__init__()
        self.partial, self.heads, self.own, self.shared = partial, heads, own, shared
        self.q = nn.Linear(8, heads * (own + shared))
        self.k_own, self.k_shared = nn.Linear(8, heads * own), nn.Linear(8, shared)
        self.v, self.out = nn.Linear(8, heads * 5), nn.Linear(heads * 5, 8)

    def forward(self, x):
        b, t, _ = x.shape
        h, n = self.heads, self.own
        q = self.q(x).view(b, t, h, -1).transpose(1, 2)
        k_own = self.k_own(x).view(b, t, h, n).transpose(1, 2)
        k_shared = self.k_shared(x).view(b, 1, t, self.shared).expand(-1, h, -1, -1)
        if self.partial:
            key = k_own.new_zeros(b, h, t, n + self.shared)
        else:
            key = k_own.new_empty(b, h, t, n + self.shared)
            key[..., n:].copy_(k_shared)
        key[..., :n].copy_(k_own)
        v = self.v(x).view(b, t, h, 5).transpose(1, 2)
        y = nn.functional.scaled_dot_product_attention(q, key, v)
        return self.out(y.transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("partial", [False, True])
def test_a_buffer_filled_by_slice_copies_is_read_as_the_cat_it_computes(partial):
    """Filled completely, the buffer is the ``cat`` of its pieces: the heads and each head's own
    key dims move (the shared part stays with its one projection). Filled in part, the ``copy_``
    ops keep what they touch fixed. Either way, a random permutation changes nothing."""
    model = double_eval(_SlicedKey(partial))
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    graph = permask.trace(model, x, frontend="export")
    unruled = {r.op for r in graph.unruled_ops}
    heads = [g for g in graph if g.size == 3 and "q.weight" in g.tensors]
    if partial:
        assert unruled == {"aten.copy_.default"} and not heads
    else:
        assert not unruled and heads and "k_own.weight" in heads[0].tensors
    for seed in range(3):
        pi = permask.random_permutation(graph, torch.Generator().manual_seed(seed))
        assert equivalence_error(model, x, pi, graph) < 1e-12


class _NestedTiles(nn.Module):
    """A buffer filled by slice copies, then copied itself into a slice of a buffer made before
    it: both fold, the outer first (its cat reads the inner buffer until that folds too)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 3), nn.Linear(4, 2), nn.Linear(4, 5)
        self.out = nn.Linear(10, 2)

    def forward(self, x):
        outer = x.new_empty(x.shape[0], 10)
        inner = x.new_empty(x.shape[0], 5)
        inner[:, :3].copy_(self.a(x))
        inner[:, 3:].copy_(self.b(x))
        outer[:, :5].copy_(inner)
        outer[:, 5:].copy_(self.c(x))
        return self.out(torch.relu(outer))


def test_nested_slice_copies_fold_both():
    model = double_eval(_NestedTiles())
    x = torch.randn(6, 4, dtype=torch.float64)
    graph = permask.trace(model, x, frontend="export")
    assert not graph.unruled_ops and sorted(g.size for g in graph) == [2, 3, 5]
    for seed in range(3):
        pi = permask.random_permutation(graph, torch.Generator().manual_seed(seed))
        assert equivalence_error(model, x, pi, graph) < 1e-12
