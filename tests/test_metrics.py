import math
import re

import pytest
import torch
from shared_data import one_thread  # noqa: F401
from torch import nn

import permask
from permask.metrics import (
    _reset_bn,
    barrier,
    ensemble_metrics,
    evaluate,
    interpolate,
    plot_interpolation,
    predict_proba,
)
from permask.models import mlp, resnet20

pytestmark = pytest.mark.usefixtures("one_thread")


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def test_ensemble_metrics_by_hand():
    p1 = [[0.5, 0.5], [0.8, 0.2]]
    p2 = [[0.25, 0.75], [0.8, 0.2]]
    labels = torch.tensor([1, 0])
    out = ensemble_metrics([torch.tensor(p1), torch.tensor(p2)], labels)
    assert out["accs"] == [0.5, 1.0]  # p1 ties on row 0: argmax picks class 0
    assert out["acc_mean"] == 0.75
    assert out["ensemble_acc"] == 1.0  # mean row 0 = [0.375, 0.625]
    assert out["disagreement"] == 0.5
    kl = (_kl(p1[0], p2[0]) + _kl(p2[0], p1[0])) / 2 / 2  # row 1 identical: 0
    assert out["kl"] == pytest.approx(kl, abs=1e-7)
    m = [0.375, 0.625]
    js = (0.5 * _kl(p1[0], m) + 0.5 * _kl(p2[0], m)) / 2
    assert out["js"] == pytest.approx(js, abs=1e-7)


def test_ensemble_metrics_zeros_and_limits():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    same = ensemble_metrics([a, a.clone(), a.clone()], torch.tensor([0, 1]))
    assert (same["disagreement"], same["kl"], same["js"]) == (0.0, 0.0, 0.0)
    assert same["ensemble_acc"] == 1.0 and same["acc_std"] == 0.0
    opposite = ensemble_metrics([a, b], torch.tensor([0, 1]))
    assert opposite["js"] == pytest.approx(math.log(2))  # disjoint supports: JS = log 2
    assert opposite["disagreement"] == 1.0
    assert math.isfinite(opposite["kl"]) and opposite["kl"] > 20  # log(1/eps), not inf/nan
    single = ensemble_metrics([a], torch.tensor([0, 1]))
    assert math.isnan(single["kl"]) and single["ensemble_acc"] == 1.0
    with pytest.raises(ValueError, match="one shape"):
        ensemble_metrics([a, torch.ones(3, 2)], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels"):
        ensemble_metrics([a], torch.tensor([0, 1, 1]))


def test_barrier_formula():
    assert barrier([0.0, 0.5, 1.0], [1.0, 3.0, 2.0]) == pytest.approx(1.5)
    assert barrier([0.0, 0.5, 1.0], [1.0, 1.0, 3.0]) == pytest.approx(0.0)  # endpoints only


def _batches(shape, n=3, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(shape, generator=g), torch.randint(0, classes, (shape[0],), generator=g))
        for _ in range(n)
    ]


def test_identical_models_have_zero_barrier():
    torch.manual_seed(0)
    a = resnet20()
    data = _batches((4, 3, 8, 8), n=2)
    res = interpolate(a, a, data, alphas=3, reset_bn=True)
    assert res["alphas"] == [0.0, 0.5, 1.0]
    assert res["barrier"] == 0.0 and res["acc_barrier"] == 0.0
    assert res["losses"][0] == res["losses"][1] == res["losses"][2]


def test_interpolation_endpoints_and_midpoint():
    torch.manual_seed(0)
    a, b = mlp(in_features=12, hidden=(16,)), mlp(in_features=12, hidden=(16,))
    data = _batches((20, 12), n=2)
    res = interpolate(a, b, data, alphas=[0.0, 0.5, 1.0], reset_bn=False)
    for model, loss in [(a, res["losses"][0]), (b, res["losses"][2])]:
        expect = (
            sum(nn.functional.cross_entropy(model(x), y, reduction="sum").item() for x, y in data)
            / 40
        )
        assert loss == pytest.approx(expect, rel=1e-6)
    mid = mlp(in_features=12, hidden=(16,))
    mid.load_state_dict({k: (v + b.state_dict()[k]) / 2 for k, v in a.state_dict().items()})
    expect = (
        sum(nn.functional.cross_entropy(mid(x), y, reduction="sum").item() for x, y in data) / 40
    )
    assert res["losses"][1] == pytest.approx(expect, rel=1e-6)
    assert a.fc1.weight.grad is None  # untouched
    with pytest.raises(ValueError, match="fc1.weight has shape"):
        interpolate(a, mlp(in_features=12, hidden=(8,)), data)


@pytest.mark.parametrize(
    "batch, named",
    [
        (torch.randn(2, 12), "a tensor of shape (2, 12)"),  # would unpack into two rows
        ({"x": torch.randn(4, 12)}, "a dict"),
        ((torch.randn(4, 12), torch.zeros(4), torch.zeros(4)), "a tuple of 3 items"),
    ],
)
def test_batches_without_targets_are_refused_by_name(batch, named):
    """Loss and accuracy need targets; a batch that is not an (inputs, targets) pair of tensors
    is named in the error, not unpacked into something else."""
    a, b = mlp(in_features=12, hidden=(16,)), mlp(in_features=12, hidden=(16,))
    with pytest.raises(TypeError, match=re.escape(named)):
        interpolate(a, b, [batch], alphas=2, reset_bn=False)


def test_reset_bn_is_a_cumulative_average():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Flatten())
    data = [(torch.randn(4, 3, 2, 2) * (i + 1) + i, None) for i in range(3)]
    _reset_bn(model, data, "cpu", None)
    bn = model[0]
    means = torch.stack([x.mean((0, 2, 3)) for x, _ in data])
    torch.testing.assert_close(bn.running_mean, means.mean(0))
    assert bn.momentum == 0.1 and not model.training
    _reset_bn(model, data, "cpu", 1)
    torch.testing.assert_close(bn.running_mean, means[0])
    _reset_bn(model, [x for x, _ in data], "cpu", None)  # input-only batches: no targets needed
    torch.testing.assert_close(bn.running_mean, means.mean(0))


def test_predict_proba_takes_input_only_batches():
    torch.manual_seed(0)
    model = mlp(in_features=12, hidden=(16,))
    xs = [torch.randn(5, 12), torch.randn(3, 12)]
    want = torch.cat([model(x).softmax(1) for x in xs]).detach()
    torch.testing.assert_close(predict_proba(model, xs), want)
    torch.testing.assert_close(predict_proba(model, [(x, torch.zeros(len(x))) for x in xs]), want)


def test_plot_interpolation(tmp_path):
    res = {
        "alphas": [0, 0.5, 1],
        "losses": [0.3, 0.9, 0.35],
        "accs": [0.9, 0.6, 0.88],
        "barrier": 0.575,
    }
    plot_interpolation(res, tmp_path / "one.png")
    plot_interpolation({"naive": res, "aligned": res}, tmp_path / "two.png", title="t")
    for name in ["one.png", "two.png"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.png", "two.png"]


def test_a_failed_plot_leaves_no_file(tmp_path):
    bad = {"alphas": [0, 1], "losses": [0.3], "accs": [0.9, 0.8], "barrier": 0.0}  # 2 vs 1 point
    with pytest.raises(ValueError):
        plot_interpolation(bad, tmp_path / "bad.png")
    assert list(tmp_path.iterdir()) == []


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 10)

    def forward(self, x, scale):
        return self.fc(x) * scale


def test_one_batch_reader_for_metrics_and_align():
    """Input-only batches, (inputs, targets) pairs and tuples of inputs mean the same to
    permask.align and to the metrics; what neither can read gets the same message."""
    torch.manual_seed(0)
    model = _TwoInputs()
    x, s, y = torch.randn(6, 12), torch.rand(6, 1) + 0.5, torch.randint(0, 10, (6,))
    want = model(x, s).softmax(1).detach()
    torch.testing.assert_close(predict_proba(model, [((x, s), y)]), want)
    torch.testing.assert_close(predict_proba(model, [((x, s),)]), want)
    loss, acc = evaluate(model, [((x, s), y)])
    assert loss == pytest.approx(nn.functional.cross_entropy(model(x, s), y).item(), rel=1e-6)
    # keyword batches (Hugging Face style): the same, "labels" as the targets
    assert evaluate(model, [{"x": x, "scale": s, "labels": y}]) == (loss, acc)
    torch.testing.assert_close(predict_proba(model, [{"scale": s, "x": x}]), want)
    assert len(permask.align(model, _TwoInputs(), [((x, s), y)])) == 0  # no hidden layer
    with pytest.raises(TypeError, match=r"tensor of shape \(6, 12\) \(inputs only\); loss and"):
        evaluate(mlp(in_features=12, hidden=(16,)), [x])
    three = (x, y, y)
    for call in (
        lambda: evaluate(mlp(in_features=12, hidden=(16,)), [three]),
        lambda: permask.align(mlp(12, (16,)), mlp(12, (16,)), [three]),
    ):
        with pytest.raises(TypeError, match=r"a tuple of 3 items \(Tensor, Tensor, Tensor\); a"):
            call()


def test_bn_batches_bounds_the_re_estimation_and_a_permuted_end_is_the_same_point():
    """What the pipeline relies on: bn_batches caps only the BatchNorm pass, and pi(A) at
    alpha = 0 gives A's loss (BatchNorm re-estimated on the same data), so one curve's end can
    stand for the other's."""
    torch.manual_seed(0)
    a, b = resnet20(1), resnet20(1)
    data = [(torch.randn(8, 3, 8, 8) * (i + 1), torch.randint(0, 10, (8,))) for i in range(3)]
    capped = interpolate(a, b, data, alphas=[0.0], bn_batches=1)
    full = interpolate(a, b, data, alphas=[0.0])
    assert capped["losses"] != full["losses"]  # statistics from 1 batch differ from 3 batches'
    one = [data[0]]  # the same single batch, evaluated on all three
    want = interpolate(a, b, data, alphas=[0.0], bn_loader=one)
    assert capped["losses"] == pytest.approx(want["losses"], rel=1e-6)
    graph = permask.trace(a, torch.randn(2, 3, 8, 8))
    moved = permask.permute_model(a, permask.random_permutation(graph), graph)
    assert interpolate(moved, b, data, alphas=[0.0])["losses"] == pytest.approx(
        full["losses"], rel=1e-5
    )
