"""permask trace / align / permute-mask / interpolate / merge on checkpoints trained here
(generated MNIST digits; an MLP, and a small BatchNorm CNN from a user's factory module), in every
checkpoint format read; outputs equal the Python API's; bad inputs exit 2, write nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import permask
from permask.cli import main
from permask.data.loader import get_loaders
from permask.merging import average
from permask.metrics import evaluate, interpolate
from permask.models import build_model
from permask.sparse import load_mask, magnitude_mask, save_mask

ROOT = Path(__file__).resolve().parents[1]
MLP = ["mlp", "--input-size", "1", "28", "28", "--model-kwargs", '{"hidden": [32, 32]}']


def _train(model: torch.nn.Module, data_dir: Path, seed: int, steps: int = 20) -> torch.nn.Module:
    torch.manual_seed(seed)
    train, _, _ = get_loaders("mnist", data_dir, batch_size=128, augment=False, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for i, (x, y) in enumerate(train):
        if i == steps:
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
    printed = capsys.readouterr().out
    assert "PermutationGraph: 2 groups" in printed
    assert "0 groups admit orthogonal maps" in printed and "relu" in printed.lower()
    assert _cli("trace", *MLP, "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["groups"]["fc1.weight:0"]["size"] == 32
    assert (
        doc["groups"]["fc1.weight:0"]["orthogonal"] is False
        and doc["rope_sites"] == doc["value_sites"] == doc["query_key_sites"] == []
    )
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
    from permask.weights import read_mask, read_state_dict

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
        ("interpolate missing", "nothere.pt' does not exist"),
        ("interpolate architecture", "does not fit the model"),
        ("interpolate perm", "is not of this model's graph"),
        ("interpolate data", "mnist"),
        ("merge one", "merge takes MODEL and two or more checkpoints"),
        ("merge missing", "nothere.pt' does not exist"),
        ("merge architecture", "does not fit the model: fc1.weight has shape (32, 784) there"),
        ("merge data", "mnist"),
    ],
)
def test_bad_inputs_exit_2_with_one_line_and_write_nothing(trained, mnist_dir, tmp_path, case,
                                                           message):  # fmt: skip
    a, b, ck = trained
    out = tmp_path / "out" / "x.safetensors" if case == "folder" else tmp_path / "x.safetensors"
    wide = ["mlp", "--input-size", "1", "28", "28", "--model-kwargs", '{"hidden": [64, 32]}']
    align = ["align", *MLP, ck / "a.pt", ck / "b.pth.tar", "--out", out]
    interp = ["interpolate", *MLP, ck / "a.pt", ck / "b.pth.tar", "--out", out]
    merge = ["merge", *MLP, ck / "a.pt", ck / "b.pth.tar", "--out", out]
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
        "interpolate missing": ["interpolate", *MLP, ck / "a.pt", ck / "nothere.pt", "--out",
                                out, "--data", "mnist", "--data-dir", mnist_dir],
        "interpolate architecture": ["interpolate", *wide, ck / "a.pt", ck / "b.pth.tar",
                                     "--out", out, "--data", "mnist", "--data-dir", mnist_dir],
        "interpolate perm": [*interp, "--data", "mnist", "--data-dir", mnist_dir,
                             "--perm", _other_pi(ck)],
        "interpolate data": [*interp, "--data", "mnist", "--data-dir", tmp_path / "empty"],
        "merge one": ["merge", *MLP, ck / "a.pt", "--out", out, "--method", "weight"],
        "merge missing": ["merge", *MLP, ck / "a.pt", ck / "b.pth.tar", ck / "nothere.pt",
                          "--out", out, "--method", "weight"],
        "merge architecture": ["merge", *wide, ck / "a.pt", ck / "b.pth.tar", "--out", out,
                               "--method", "weight"],
        "merge data": [*merge, "--data", "mnist", "--data-dir", tmp_path / "empty"],
    }[case]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "permask", *map(str, argv)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) in ([], ["empty"])


CNN_SOURCE = """
from torch import nn


def small_cnn(num_classes=10):
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 7 * 7, num_classes),
    )
"""
CNN = ["permask_test_cnn:small_cnn", "--input-size", "1", "28", "28", "--num-classes", "10"]


@pytest.fixture(scope="module")
def cnns(mnist_dir, tmp_path_factory):
    """A user's module with a small BatchNorm CNN (importable while the tests run), and three
    CNNs trained briefly from different seeds, saved as safetensors and torch files."""
    out = tmp_path_factory.mktemp("cnn")
    (out / "permask_test_cnn.py").write_text(CNN_SOURCE)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(out))
        from permask_test_cnn import small_cnn

        models = []
        for seed in (3, 4, 5):
            torch.manual_seed(seed)
            models.append(_train(small_cnn(), mnist_dir, seed, steps=30))
        torch.save(models[0].state_dict(), out / "c0.pt")
        for i in (1, 2):
            sd = {k: v.contiguous() for k, v in models[i].state_dict().items()}
            save_file(sd, out / f"c{i}.safetensors")
        yield models, [out / "c0.pt", out / "c1.safetensors", out / "c2.safetensors"]


def _loaders(mnist_dir):
    train, test, _ = get_loaders("mnist", mnist_dir, batch_size=128, augment=False)
    return train, test


@pytest.mark.parametrize("arch, bn_reset", [("mlp", True), ("cnn", True), ("cnn", False)])
def test_interpolate_equals_the_python_api(trained, cnns, mnist_dir, tmp_path, capsys, arch,
                                           bn_reset):  # fmt: skip
    if arch == "mlp":
        a, b, ck = trained
        fa, fb, spec = ck / "a.pt", ck / "b.pth.tar", MLP
    else:
        (a, b, _), (fa, fb, _), spec = *cnns, CNN
    graph = permask.trace(a, torch.randn(2, 1, 28, 28))
    pi = permask.align(a, b, method="weight", graph=graph)
    pi.save(tmp_path / "pi.safetensors")
    out = tmp_path / "interp"
    flags = ["--data", "mnist", "--data-dir", mnist_dir, "--batches", "3", "--points", "5"]
    assert _cli("interpolate", *spec, fa, fb, "--perm", tmp_path / "pi.safetensors", *flags,
                "--out", out, *([] if bn_reset else ["--no-bn-reset"])) == 0  # fmt: skip
    train, test = _loaders(mnist_dir)
    want = interpolate(permask.permute_model(a, pi, graph), b, test, alphas=5,
                       reset_bn=bn_reset, bn_loader=train, bn_batches=3)  # fmt: skip
    got = json.loads((out / "interpolation.json").read_text())
    assert {k: got[k] for k in want} == want
    assert got["bn_reset"] is bn_reset and got["perm"] == str(tmp_path / "pi.safetensors")
    rows = (out / "interpolation.csv").read_text().splitlines()
    assert rows[0] == "alpha,loss,acc" and len(rows) == 6
    assert [float(v) for v in rows[3].split(",")] == [0.5, want["losses"][2], want["accs"][2]]
    assert (out / "interpolation.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert f"loss {want['barrier']:.4f}, accuracy {100 * want['acc_barrier']:.2f} points" in printed
    assert ("re-estimated at every point" in printed) == (arch == "cnn" and bn_reset)


def test_interpolate_without_perm_is_the_naive_path(trained, mnist_dir, tmp_path, capsys):
    a, b, ck = trained
    assert _cli("interpolate", *MLP, ck / "a.safetensors", ck / "b.pth.tar", "--data", "mnist",
                "--data-dir", mnist_dir, "--points", "3", "--out", tmp_path) == 0  # fmt: skip
    want = interpolate(a, b, _loaders(mnist_dir)[1], alphas=3)
    assert json.loads((tmp_path / "interpolation.json").read_text())["losses"] == want["losses"]
    assert "A -> B (not aligned)" in capsys.readouterr().out


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_merge_equals_the_python_api(trained, cnns, mnist_dir, tmp_path, capsys, arch):
    a, b, ck = trained
    if arch == "mlp":  # two checkpoints, aligned to the second
        models, files, spec, ref = [a, b], [ck / "a.safetensors", ck / "b.pth.tar"], MLP, 1
    else:  # three, BatchNorm statistics re-estimated
        models, files, spec, ref = cnns[0], cnns[1], CNN, 0
    out = tmp_path / "merged.safetensors"
    assert _cli("merge", *spec, *files, "--reference", ref, "--out", out, "--data", "mnist",
                "--data-dir", mnist_dir, "--batches", "4") == 0  # fmt: skip
    train, test = _loaders(mnist_dir)
    graph = permask.trace(models[ref], torch.randn(2, 1, 28, 28))
    want = permask.merge(models, train, reference=ref, graph=graph, max_batches=4)
    naive = average(models, reference=ref, bn_loader=train, max_batches=4)
    got = load_file(out)
    assert got.keys() == want.state_dict().keys()
    assert all(torch.equal(got[k], v) for k, v in want.state_dict().items())
    table = capsys.readouterr().out.splitlines()
    names = [f.name for f in files] + ["naive average", "merged"]
    assert len(table) == len(names) + 2 and "(reference)" in table[ref + 1]
    for line, name, model in zip(table[1:], names, [*models, naive, want]):
        loss, acc = evaluate(model, test)
        assert line.startswith(name) and line.split()[-2:] == [f"{loss:.4f}", f"{100 * acc:.2f}%"]


def test_merge_by_weight_matching_needs_no_data(trained, tmp_path, capsys):
    a, b, ck = trained
    out = tmp_path / "merged.safetensors"
    assert _cli("merge", *MLP, ck / "a.pt", ck / "b.pth.tar", "--method", "weight",
                "--out", out) == 0  # fmt: skip
    graph = permask.trace(a, torch.randn(2, 1, 28, 28))
    want = permask.merge([a, b], method="weight", graph=graph).state_dict()
    assert all(torch.equal(load_file(out)[k], v) for k, v in want.items())
    assert "not evaluated: no --data" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["interpolate", "--points", "1"], "--points must be at least 2, got 1"),
        (["interpolate", "--out-is-a-file"], "is a file; give a folder"),
        (["merge"], "activation matching needs --data"),
        (["merge", "--reference", "2"], "--reference must be 0..1 (a CKPT's index), got 2"),
        (["merge", "--out-folder"], "folder"),
    ],
)
def test_flag_errors_exit_2_with_one_line_and_write_nothing(trained, tmp_path, capsys, flags,
                                                            message):  # fmt: skip
    """The contract above for the checks of flags, in this process (faster than a subprocess)."""
    ck = trained[2]
    out = tmp_path / "x"
    if "--out-is-a-file" in flags:
        out.write_bytes(b"")
    elif "--out-folder" in flags:
        out = tmp_path / "no" / "x.safetensors"
    before = sorted(tmp_path.rglob("*"))
    command, *rest = [f for f in flags if not f.startswith("--out-")]
    data = ["--data", "mnist"] if command == "interpolate" else []
    assert _cli(command, *MLP, ck / "a.pt", ck / "b.pth.tar", "--out", out, *data, *rest) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert sorted(tmp_path.rglob("*")) == before


def test_interpolate_and_merge_with_repair_equal_the_python_api(trained, mnist_dir, tmp_path,
                                                                  capsys):  # fmt: skip
    """--repair (an MLP: no BatchNorm, so REPAIR corrects every hidden layer)."""
    a, b, ck = trained
    graph = permask.trace(a, torch.randn(2, 1, 28, 28))
    pi = permask.align(a, b, method="weight", graph=graph)
    pi.save(tmp_path / "pi.safetensors")
    data = ["--data", "mnist", "--data-dir", mnist_dir, "--batches", "3"]
    assert _cli("interpolate", *MLP, ck / "a.pt", ck / "b.pth.tar", "--perm",
                tmp_path / "pi.safetensors", *data, "--points", "3", "--repair",
                "--out", tmp_path / "interp") == 0  # fmt: skip
    train, test = _loaders(mnist_dir)
    want = interpolate(permask.permute_model(a, pi, graph), b, test, alphas=3, bn_loader=train,
                       bn_batches=3, repair=True, graph=graph)  # fmt: skip
    got = json.loads((tmp_path / "interp" / "interpolation.json").read_text())
    assert got["losses"] == want["losses"] and got["repair"] is True
    assert "REPAIR applied at every point" in capsys.readouterr().out
    out = tmp_path / "merged.safetensors"
    assert _cli("merge", *MLP, ck / "a.pt", ck / "b.pth.tar", "--out", out, *data,
                "--repair") == 0  # fmt: skip
    train = _loaders(mnist_dir)[0]  # fresh: a loader reshuffles on every pass
    merged = permask.merge([a, b], train, graph=graph, max_batches=3, repair=True)
    diffs = {k: (load_file(out)[k] - v).abs().max().item() for k, v in merged.state_dict().items()}
    assert max(diffs.values()) == 0, diffs
    assert "merged + REPAIR" in capsys.readouterr().out
    assert _cli("merge", *MLP, ck / "a.pt", ck / "b.pth.tar", "--method", "weight", "--out",
                tmp_path / "x.safetensors", "--repair") == 2  # fmt: skip
    assert not (tmp_path / "x.safetensors").exists()


def test_ema_weights_are_read_with_ema(trained, tmp_path):
    """timm's training checkpoints hold the EMA weights beside the raw ones: --ema takes them
    (from every checkpoint; one without EMA weights is an error, not a silent fallback)."""
    a, b, ck = trained
    for name, raw, ema in (("x", a, b), ("y", b, a)):
        torch.save({"state_dict": raw.state_dict(), "state_dict_ema": ema.state_dict(),
                    "epoch": 9}, tmp_path / f"{name}.pth.tar")  # fmt: skip
    graph = permask.trace(a, torch.randn(2, 1, 28, 28))
    for flag, (want_a, want_b) in (([], (a, b)), (["--ema"], (b, a))):
        out = tmp_path / f"pi{len(flag)}.safetensors"
        assert _cli("align", *MLP, tmp_path / "x.pth.tar", tmp_path / "y.pth.tar", "--method",
                    "weight", "--out", out, *flag) == 0  # fmt: skip
        want = permask.align(want_a, want_b, method="weight", graph=graph)
        assert permask.Permutation.load(out) == want
    assert _cli("align", *MLP, tmp_path / "x.pth.tar", ck / "b.pth.tar", "--method", "weight",
                "--out", tmp_path / "z.safetensors", "--ema") == 2  # fmt: skip
