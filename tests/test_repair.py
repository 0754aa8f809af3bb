"""REPAIR: which layers it corrects, that the corrected channels get the goal statistics
exactly (one batch, so batch and total statistics agree), and that it lowers the barrier of an
aligned norm-free CNN trained here."""

from __future__ import annotations

import copy

import pytest
import torch
from shared_data import torch_threads
from torch import nn

import permask
from permask.data.loader import get_loaders
from permask.metrics import interpolate
from permask.repair import Repair, _stats, repair, repairable_layers


def _cnn(bn: bool = False, bias: bool = True) -> nn.Module:
    norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=bias), norm(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1, bias=bias), norm(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10),
    )  # fmt: skip


def _mid(a: nn.Module, b: nn.Module, alpha: float) -> nn.Module:
    mid, sd_b = copy.deepcopy(a), b.state_dict()
    mid.load_state_dict({k: torch.lerp(v, sd_b[k], alpha) for k, v in a.state_dict().items()})
    return mid


def test_layers_skip_the_output_and_convs_that_batchnorm_renormalises():
    x = torch.randn(2, 1, 28, 28)
    plain, with_bn = _cnn(), _cnn(bn=True)
    assert repairable_layers(plain, permask.trace(plain, x)) == ["0", "4", "9"]
    assert repairable_layers(with_bn, permask.trace(with_bn, x)) == ["9"]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_repaired_channels_have_the_goal_statistics(bias):
    torch.manual_seed(0)
    a, b = _cnn(bias=bias).double(), _cnn(bias=bias).double()
    data = [torch.randn(64, 1, 28, 28, dtype=torch.float64)]  # one batch: exact statistics
    mid = _mid(a, b, 0.3)
    fixed = repair(mid, [a, b], data, weights=[0.7, 0.3])
    layers = repairable_layers(a, permask.trace(a, data[0]))
    cpu = torch.device("cpu")
    got = _stats(fixed, layers, data, cpu, None)
    src = [_stats(m, layers, data, cpu, None) for m in (a, b)]
    for k in layers:
        goal_std = 0.7 * src[0][k][1] + 0.3 * src[1][k][1]
        # the relative eps (1e-5) shrinks the std by ~5e-6
        torch.testing.assert_close(got[k][1], goal_std, rtol=1e-4, atol=0)
        if bias:  # without a bias only the scale can move
            torch.testing.assert_close(got[k][0], 0.7 * src[0][k][0] + 0.3 * src[1][k][0])
    assert not torch.equal(mid.state_dict()["0.weight"], fixed.state_dict()["0.weight"])


def test_repair_of_a_model_by_itself_changes_nothing_and_copies():
    torch.manual_seed(0)
    a = _cnn().double()
    data = [torch.randn(32, 1, 28, 28, dtype=torch.float64)]
    before = {k: v.clone() for k, v in a.state_dict().items()}
    fixed = Repair([a], data)(a)
    assert fixed is not a and all(torch.equal(v, a.state_dict()[k]) for k, v in before.items())
    torch.testing.assert_close(fixed(data[0]), a(data[0]), rtol=1e-4, atol=1e-4)


def test_bad_weights_name_the_fix():
    a = _cnn()
    data = [torch.randn(4, 1, 28, 28)]
    with pytest.raises(ValueError, match="need 2 non-negative weights"):
        repair(a, [a, a], data, weights=[0.5, 0.6])
    with pytest.raises(ValueError, match="at least one source"):
        repair(a, [], data)


def _deep_cnn(width: int = 8, depth: int = 6) -> nn.Module:
    """Narrow and norm-free (VGG-style): where averaging collapses the variance most."""
    layers, c = [], 1
    for i in range(depth):
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU()]
        c = width
        if i in (1, 4):
            layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * 7 * 7, 10))


def _train(model: nn.Module, loader, steps: int, seed: int) -> nn.Module:
    """``steps`` Adam steps in the model's dtype."""
    torch.manual_seed(seed)
    dtype = next(model.parameters()).dtype
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for i, (x, y) in enumerate(loader):
        if i == steps:
            break
        opt.zero_grad()
        nn.functional.cross_entropy(model(x.to(dtype)), y).backward()
        opt.step()
    return model.eval()


class _AsDouble:
    """A loader's batches with float64 images (the models below are float64)."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return ((x.double(), y) for x, y in self.loader)

    def __len__(self) -> int:
        return len(self.loader)


@pytest.mark.outcome
def test_repair_lowers_the_barrier_of_an_aligned_norm_free_cnn(mnist_dir):
    """A width-16 pair, trained in float64 with the threads set here: REPAIR's gain must hold on
    any CPU's kernels, and a width-8 pair's did not (its 150 steps landed elsewhere with other
    kernels, and REPAIR sometimes raised the barrier). The measured ratios (fixed / plain
    barrier) of seed pairs (1, 2), (3, 4), (5, 6) under ATEN_CPU_CAPABILITY avx2 and default
    are in docs/results.md ("Which figures depend on the CPU's kernels"); the assertion's 0.5
    is above the worst of them, so it holds for any of those pairs on either kernel set."""
    with torch_threads(2):
        train, test, _ = get_loaders("mnist", mnist_dir, batch_size=128, augment=False)
        train, test = _AsDouble(train), _AsDouble(test)
        torch.manual_seed(1)
        a = _train(_deep_cnn(width=16).double(), train, 150, 1)
        torch.manual_seed(2)
        b = _train(_deep_cnn(width=16).double(), train, 150, 2)
        graph = permask.trace(a, torch.randn(2, 1, 28, 28, dtype=torch.float64))
        pi = permask.align(a, b, train, graph=graph, max_batches=8)
        a_pi = permask.permute_model(a, pi, graph)
        args = dict(alphas=5, bn_loader=train, bn_batches=8, max_batches=4)
        plain = interpolate(a_pi, b, test, **args)
        fixed = interpolate(a_pi, b, test, repair=True, graph=graph, **args)
    assert plain["barrier"] > 0.1  # the aligned path does have a barrier to remove
    assert fixed["barrier"] < 0.5 * plain["barrier"], (fixed["barrier"], plain["barrier"])
    # endpoints nearly kept (batch vs total statistics in the correcting pass: about 1-3%)
    assert fixed["losses"][0] == pytest.approx(plain["losses"][0], rel=0.05)


def test_an_exported_graph_names_the_same_layers():
    """The export front end calls aten.linear/conv on get_attr weights: the same modules."""
    x = torch.randn(2, 1, 28, 28)
    for model in (_cnn(), _cnn(bn=True)):
        want = repairable_layers(model, permask.trace(model, x, frontend="fx"))
        assert repairable_layers(model, permask.trace(model, x, frontend="export")) == want


def _hf(kind: str, seed: int) -> nn.Module:
    pytest.importorskip("transformers")
    from test_graph_hf import _model  # tiny configs, random weights, no downloads

    model = _model(kind)  # it seeds itself: the matrices are drawn again from ours
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(0.02 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _hf_graph(model: nn.Module):
    from test_graph_hf import _trace

    return _trace(model)


def test_hugging_face_conv1d_is_repaired_and_attention_scores_are_not():
    from permask.repair import repair_channels

    gpt2 = _hf("gpt2", 0)
    channels = repair_channels(gpt2, _hf_graph(gpt2))
    assert "transformer.h.0.mlp.c_fc" in channels and bool(
        channels["transformer.h.0.mlp.c_fc"].all()
    )
    c_attn = channels["transformer.h.0.attn.c_attn"]  # [q | k | v]: v alone is corrected
    assert c_attn.tolist() == [False] * 64 + [True] * 32
    llama = _hf("llama", 0)
    names = repairable_layers(llama, _hf_graph(llama))
    assert not [n for n in names if n.endswith(("q_proj", "k_proj"))]  # RoPE'd scores
    assert {"model.layers.0.self_attn.v_proj", "model.layers.0.mlp.up_proj"} <= set(names)


def test_repair_gives_a_gpt2_average_the_goal_statistics():
    """REPAIR's one-batch guarantee on GPT-2's Conv1D layers: the corrected channels of the
    average get the sources' mean statistics; q and k channels keep the average's own."""
    a, b = _hf("gpt2", 1), _hf("gpt2", 2)
    graph = _hf_graph(a)
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(3))
    data = [{"input_ids": ids}]
    mid = _mid(a, b, 0.5)
    fixed = repair(mid, [a, b], data, graph=graph)
    cpu = torch.device("cpu")
    layers = ["transformer.h.1.mlp.c_fc", "transformer.h.1.attn.c_attn"]
    got, before = _stats(fixed, layers, data, cpu, None), _stats(mid, layers, data, cpu, None)
    src = [_stats(m, layers, data, cpu, None) for m in (a, b)]
    goal_std = (src[0]["transformer.h.1.mlp.c_fc"][1] + src[1]["transformer.h.1.mlp.c_fc"][1]) / 2
    torch.testing.assert_close(got["transformer.h.1.mlp.c_fc"][1], goal_std, rtol=1e-4, atol=0)
    assert not torch.allclose(before["transformer.h.1.mlp.c_fc"][1], goal_std, rtol=1e-2)
    v_goal = (
        src[0]["transformer.h.1.attn.c_attn"][1] + src[1]["transformer.h.1.attn.c_attn"][1]
    ) / 2
    torch.testing.assert_close(
        got["transformer.h.1.attn.c_attn"][1][64:], v_goal[64:], rtol=1e-4, atol=0
    )
    qk_w = fixed.get_parameter("transformer.h.0.attn.c_attn.weight")[:, :64]
    assert torch.equal(qk_w, mid.get_parameter("transformer.h.0.attn.c_attn.weight")[:, :64])


def test_no_layer_to_repair_is_said():
    model = nn.Sequential(nn.Linear(4, 3))  # its one output is the logits: frozen
    data = [torch.randn(8, 4)]
    with pytest.warns(UserWarning, match="REPAIR found no layer to correct"):
        fixed = repair(model, [model], data)
    assert torch.equal(fixed[0].weight, model[0].weight)
