"""permask.merge (Git Re-Basin model merging): its contract on small random nets (permuted copies
merge back exactly, inputs untouched, the average and BatchNorm re-estimation, errors), and three
MLPs trained here on generated MNIST digits, whose merge beats their naive average (Python and
``permask merge``)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import permask
from permask.cli import main
from permask.data.loader import get_loaders
from permask.merging import average
from permask.metrics import _reset_bn, evaluate
from permask.models import build_model


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", 10, 1, 8, hidden=[16, 16])


def _cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * 8 * 8, 10))  # fmt: skip


def _loader(batches: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g))
            for _ in range(batches)]  # fmt: skip


def _permuted_copies(model: nn.Module) -> tuple[list[nn.Module], permask.PermutationGraph]:
    graph = permask.trace(model, torch.randn(2, 1, 8, 8))
    g = torch.Generator().manual_seed(1)
    copies = [permask.permute_model(model, permask.random_permutation(graph, g), graph)
              for _ in range(2)]  # fmt: skip
    return [model, *copies], graph


@pytest.mark.parametrize("method, given_graph", [("weight", True), ("activation", True),
                                                 ("activation", False)])  # fmt: skip
@pytest.mark.parametrize("reference", [0, 2])
def test_permuted_copies_merge_back_into_the_reference(method, given_graph, reference):
    models, graph = _permuted_copies(_mlp(0))
    loader = _loader() if method == "activation" else None
    merged = permask.merge(models, loader, reference=reference, method=method,
                           graph=graph if given_graph else None)  # fmt: skip
    want = models[reference].state_dict()
    assert merged.state_dict().keys() == want.keys()
    for k, v in want.items():
        torch.testing.assert_close(merged.state_dict()[k], v)


def test_merge_is_the_average_of_the_aligned_models_and_leaves_them_alone():
    models = [_cnn(s) for s in range(3)]
    before = [copy.deepcopy(m.state_dict()) for m in models]
    loader = _loader()
    merged = permask.merge(models, loader, reference=1, max_batches=2)
    graph = permask.trace(models[1], loader[0][0])
    moved = [permask.permute_model(m, permask.align(m, models[1], loader, graph=graph,
                                                    max_batches=2), graph)
             for m in (models[0], models[2])]  # fmt: skip
    want = average([moved[0], models[1], moved[1]], reference=1, bn_loader=loader, max_batches=2)
    for k, v in want.state_dict().items():
        assert torch.equal(merged.state_dict()[k], v), k
    for m, sd in zip(models, before):
        assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())
    ours = {p.data_ptr() for m in models for p in m.parameters()}
    assert not ours & {p.data_ptr() for p in merged.parameters()}


def test_average_is_the_float_mean_with_the_references_other_buffers():
    models = [_cnn(s) for s in range(3)]
    for i, m in enumerate(models):
        m[1].num_batches_tracked.fill_(10 + i)
        m[1].running_var.uniform_(0.5, 2.0)
    avg = average(models, reference=2).state_dict()
    for k, v in avg.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, torch.stack([m.state_dict()[k] for m in models]).mean(0))
    assert int(avg["1.num_batches_tracked"]) == 12


def test_average_re_estimates_batchnorm_statistics_on_the_loader():
    models, loader = [_cnn(s) for s in range(2)], _loader()
    avg = average(models, bn_loader=loader, max_batches=3)
    want = average(models)
    with torch.no_grad():
        _reset_bn(want, loader, "cpu", 3)
    assert not avg.training
    for k in ("1.running_mean", "1.running_var"):
        assert torch.equal(avg.state_dict()[k], want.state_dict()[k])
        assert not torch.allclose(avg.state_dict()[k], average(models).state_dict()[k])


@pytest.mark.parametrize(
    "case, message",
    [
        ("one model", "at least 2 models, got 1"),
        ("reference", "reference must be in 0..1, got 2"),
        ("architecture", "model 1 is not the reference's architecture"),
        ("no loader", "needs a loader; or method='weight'"),
        ("no graph", "needs graph= or a loader"),
        ("method", "unknown method 'lap'"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(case, message):
    a, b = _mlp(0), _mlp(1)
    call = {
        "one model": lambda: permask.merge([a], _loader()),
        "reference": lambda: permask.merge([a, b], _loader(), reference=2),
        "architecture": lambda: permask.merge([a, _cnn(0)], _loader()),
        "no loader": lambda: permask.merge([a, b]),
        "no graph": lambda: permask.merge([a, b], method="weight"),
        "method": lambda: permask.merge([a, b], _loader(), method="lap"),
    }[case]
    with pytest.raises(ValueError, match=message):
        call()


@pytest.fixture(scope="module")
def three_mlps(mnist_dir, tmp_path_factory):
    """Three 784-128-128-10 MLPs trained two epochs each from seeds 0, 1, 2 (test accuracy about
    97%), saved as safetensors."""
    out = tmp_path_factory.mktemp("three")
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = build_model("mlp", 10, 1, 28, hidden=[128, 128])
        train, _, _ = get_loaders("mnist", mnist_dir, batch_size=128, augment=False, seed=seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
        for _ in range(2):
            for x, y in train:
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
        save_file(dict(model.state_dict()), out / f"m{seed}.safetensors")
        models.append(model)
    return models, [out / f"m{s}.safetensors" for s in range(3)]


@pytest.mark.outcome
def test_merging_three_aligned_mlps_beats_their_naive_average(three_mlps, mnist_dir, tmp_path,
                                                              capsys):  # fmt: skip
    models, files = three_mlps
    spec = ["mlp", "--input-size", "1", "28", "28", "--model-kwargs", '{"hidden": [128, 128]}']
    out = tmp_path / "merged.safetensors"
    assert main([*map(str, ["merge", *spec, *files, "--out", out, "--data", "mnist",
                            "--data-dir", mnist_dir, "--batches", "20"])]) == 0  # fmt: skip
    rows = [line.rsplit(None, 2) for line in capsys.readouterr().out.splitlines()[1:-1]]
    train, test, _ = get_loaders("mnist", mnist_dir, batch_size=128, augment=False)
    graph = permask.trace(models[0], torch.randn(2, 1, 28, 28))  # as the command: no batch read
    merged = permask.merge(models, train, graph=graph, max_batches=20)
    assert all(torch.equal(load_file(out)[k], v) for k, v in merged.state_dict().items())
    weight = permask.merge(models, method="weight", graph=graph)
    (m_loss, m_acc), (w_loss, w_acc), (n_loss, n_acc) = (
        evaluate(m, test) for m in (merged, weight, average(models))
    )
    ends = [evaluate(m, test)[0] for m in models]
    print(f"\nends {ends}; merged {m_loss:.4f} ({m_acc:.3f}), weight-matched {w_loss:.4f} "
          f"({w_acc:.3f}), naive {n_loss:.4f} ({n_acc:.3f})")  # fmt: skip
    assert m_loss < 0.5 * n_loss and w_loss < 0.5 * n_loss
    assert m_acc > n_acc + 0.1 and w_acc > n_acc + 0.1
    table = {name: loss for name, loss, _ in rows}
    assert table["merged"] == f"{m_loss:.4f}" and table["naive average"] == f"{n_loss:.4f}"
