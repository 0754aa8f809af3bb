"""permask trace / align / permute-mask on checkpoints trained here (generated MNIST digits), in
every checkpoint format read; outputs equal the Python API's; bad inputs exit 2, write nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import permask
from permask.cli import main
from permask.experiment.loader import get_loaders
from permask.experiment.models import build_model
from permask.sparse import load_mask, magnitude_mask, save_mask

ROOT = Path(__file__).resolve().parents[1]
MLP = ["mlp", "--input-size", "1", "28", "28", "--model-kwargs", '{"hidden": [32, 32]}']


def _train(model: torch.nn.Module, data_dir: Path, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    train, _, _ = get_loaders("mnist", data_dir, batch_size=128, augment=False, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for i, (x, y) in enumerate(train):
        if i == 20:
            break
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def _mlp() -> torch.nn.Module:
    return build_model("mlp", 10, 1, 28, hidden=[32, 32])


@pytest.fixture(scope="module")
def trained(mnist_dir, tmp_path_factory):
    """A and B trained briefly, saved as safetensors, a plain torch state dict, and timm's
    {"state_dict": ...} with DDP's "module." prefix; a 90% mask of A."""
    out = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    a, b = _train(_mlp(), mnist_dir, 1), _train(_mlp(), mnist_dir, 2)
    save_file({k: v.contiguous() for k, v in a.state_dict().items()}, out / "a.safetensors")
    torch.save(a.state_dict(), out / "a.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in b.state_dict().items()},
                "epoch": 3}, out / "b.pth.tar")  # fmt: skip
    save_mask(magnitude_mask(a, 0.9), out / "mask_a.safetensors")
    return a, b, out


def _cli(*argv: str) -> int:
    return main([str(a) for a in argv])


def test_trace_prints_the_graph_and_json(capsys):
    assert _cli("trace", *MLP) == 0
    assert "PermutationGraph: 2 groups" in capsys.readouterr().out
    assert _cli("trace", *MLP, "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["groups"]["fc1.weight:0"]["size"] == 32
    assert "fc1.weight:0" in doc["groups"]["fc1.weight:0"]["members"]


@pytest.mark.parametrize("a_file", ["a.safetensors", "a.pt"])
def test_align_and_permute_mask_equal_the_python_api(trained, mnist_dir, tmp_path, a_file):
    a, b, ck = trained
    pi_path, moved = tmp_path / "pi.safetensors", tmp_path / "mask_b.safetensors"
    data = ["--data", "mnist", "--data-dir", mnist_dir, "--batches", "5"]
    assert _cli("align", *MLP, ck / a_file, ck / "b.pth.tar", "--out", pi_path, *data,
                "--save-permuted", tmp_path / "a_pi.safetensors") == 0  # fmt: skip
    train, _, _ = get_loaders("mnist", mnist_dir, batch_size=128, augment=False)
    graph = permask.trace(a, torch.randn(2, 1, 28, 28))
    want = permask.align(a, b, train, graph=graph, max_batches=5)
    assert permask.Permutation.load(pi_path) == want
    from safetensors.torch import load_file

    permuted = load_file(tmp_path / "a_pi.safetensors")
    expect = permask.permute_model(a, want, graph).state_dict()
    assert all(torch.equal(permuted[k], expect[k]) for k in expect)
    assert _cli("permute-mask", *MLP, ck / "mask_a.safetensors", "--perm", pi_path,
                "--out", moved) == 0  # fmt: skip
    mask_a = load_mask(ck / "mask_a.safetensors")
    expect_mask = permask.permute_mask(mask_a, want, graph)
    assert all(torch.equal(load_mask(moved)[k], expect_mask[k]) for k in expect_mask)


def test_weight_matching_needs_no_data(trained, tmp_path):
    a, b, ck = trained
    assert _cli("align", *MLP, ck / "a.pt", ck / "b.pth.tar", "--method", "weight",
                "--out", tmp_path / "pi.safetensors") == 0  # fmt: skip
    graph = permask.trace(a, torch.randn(2, 1, 28, 28))
    want = permask.align(a, b, method="weight", graph=graph)
    assert permask.Permutation.load(tmp_path / "pi.safetensors") == want


def test_a_torch_pruned_checkpoint_gives_weights_and_mask(trained, tmp_path):
    a, _, ck = trained
    pruned = _mlp()
    pruned.load_state_dict(a.state_dict())
    torch.nn.utils.prune.l1_unstructured(pruned.fc1, "weight", amount=0.5)
    torch.save(pruned.state_dict(), tmp_path / "pruned.pt")
    from permask.experiment.checkpoints import read_mask, read_state_dict

    sd = read_state_dict(tmp_path / "pruned.pt")
    torch.testing.assert_close(sd["fc1.weight"], pruned.fc1.weight)
    assert torch.equal(
        read_mask(tmp_path / "pruned.pt")["fc1.weight"], pruned.fc1.weight_mask.bool()
    )


def _other_pi(folder: Path) -> Path:
    """A permutation of a wider MLP's graph (its fc1 group has 64 elements, not 32)."""
    other = build_model("mlp", 10, 1, 28, hidden=[64, 32])
    path = folder / "pi_other.safetensors"
    permask.random_permutation(permask.trace(other, torch.randn(2, 1, 28, 28))).save(path)
    return path


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist"),
        ("architecture", "does not fit the model: fc1.weight has shape (32, 784) there"),
        ("data", "mnist"),
        ("no data", "needs --data"),
        ("mask", "names no parameter"),
        ("perm", "is not of this model's graph"),
        ("folder", "folder"),
    ],
)
def test_bad_inputs_exit_2_with_one_line_and_write_nothing(trained, tmp_path, case, message):
    a, b, ck = trained
    out = tmp_path / "out" / "x.safetensors" if case == "folder" else tmp_path / "x.safetensors"
    wide = ["mlp", "--input-size", "1", "28", "28", "--model-kwargs", '{"hidden": [64, 32]}']
    align = ["align", *MLP, ck / "a.pt", ck / "b.pth.tar", "--out", out]
    argv = {
        "missing": ["align", *MLP, ck / "nothere.pt", ck / "b.pth.tar", "--out", out,
                    "--method", "weight"],
        "architecture": ["align", *wide, ck / "a.pt", ck / "b.pth.tar", "--out", out,
                         "--method", "weight"],
        "data": [*align, "--data", "mnist", "--data-dir", tmp_path / "empty"],
        "no data": align,
        "mask": ["permute-mask", "resnet20", "--perm", ck / "a.safetensors",
                 ck / "mask_a.safetensors", "--out", out],
        "perm": ["permute-mask", *MLP, ck / "mask_a.safetensors", "--perm", _other_pi(ck),
                 "--out", out],
        "folder": [*align, "--method", "weight"],
    }[case]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "permask", *map(str, argv)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) in ([], ["empty"])
