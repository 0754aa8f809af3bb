"""``permask run`` under torchrun: two real processes (gloo on the CPU) against one process with
the same global batch and seeds, and a rank SIGKILLed mid-training, then resumed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from shared_data import tiny_flags, write_image_folder

from permask.cli import _parser
from permask.experiment.config import config_from_flags
from permask.experiment.pipeline import prepare
from permask.experiment.train import load_checkpoint
from permask.graph import Permutation
from permask.sparse import load_mask

ROOT = Path(__file__).resolve().parents[1]


def _flags(data: Path) -> list[str]:
    """The shared tiny run, one seed of three epochs in batches of 100 (two ranks: 50 each)."""
    return tiny_flags(data, epochs=3, seeds=1, interp_points=3, batch_size=100)


def _cli(out: Path, data: Path, nproc: int, *extra: str) -> list[str]:
    run = ["-m", "permask", "run", "--out", str(out), *_flags(data), *extra]
    if nproc == 1:
        return [sys.executable, *run]
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    return [sys.executable, *launch, *run]


def _run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}  # a crash prints where each rank was
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _rows(out: Path) -> list[dict]:
    rows = json.loads((out / "results.json").read_text())["rows"]
    return [{k: v for k, v in r.items() if k != "train_seconds"} for r in rows]


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory, mnist_dir):
    root = tmp_path_factory.mktemp("dist")
    _run(_cli(root / "one", mnist_dir, 1))
    _run(_cli(root / "two", mnist_dir, 2))
    return root / "one", root / "two"


def _relu_outputs(run_dir: Path, data: Path, stage: str) -> dict[str, torch.Tensor]:
    """Per MLP unit (group name), the trained model's ReLU outputs on the matching data,
    ``[samples, units]`` in float64."""
    args = _parser().parse_args(["run", *_flags(data), "--out", str(run_dir)])
    exp = prepare(config_from_flags(args))
    model = exp.build(0)
    load_checkpoint(run_dir / "seed0" / stage / "last.pt", model)
    outputs: dict[int, list[torch.Tensor]] = {i: [] for i in (1, 2, 3)}
    for i in outputs:
        getattr(model, f"relu{i}").register_forward_hook(lambda m, x, y, i=i: outputs[i].append(y))
    with torch.no_grad():
        for x, _ in exp.statistics_loader():
            model(x)
    return {f"fc{i}.weight:0": torch.cat(ys).double() for i, ys in outputs.items()}


def _alike(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per column, whether two units' outputs are equal up to scale (a correlation of 1 within
    1e-9: units that fire on the same single sample): the data cannot tell them apart."""
    x, y = x - x.mean(0), y - y.mean(0)
    corr = (x * y).sum(0) / (x.norm(dim=0) * y.norm(dim=0)).clamp_min(1e-300)
    return corr > 1 - 1e-9


@pytest.mark.outcome
def test_two_processes_take_the_steps_of_one(one_and_two, mnist_dir):
    """The same IMP masks but at the pruning threshold (:func:`_assert_masks_agree`); the same
    permutation wherever the data determines it (ReLUs that never fire, or two that fire on the
    same single sample, are paired by their weights, and weights 1e-8 apart pair them
    differently in one process too);
    accuracies and weights equal up to float summation order (gloo sums the ranks' gradients,
    one process sums the whole batch; a sample crossing a ReLU's kink amplifies it a little)."""
    one, two = one_and_two
    s1, s2 = one / "seed0", two / "seed0"
    _assert_masks_agree(*(d / "masks" / "imp_s0.5.safetensors" for d in (s1, s2)))
    pi1, pi2 = (dict(Permutation.load(d / "align" / "pi.safetensors")) for d in (s1, s2))
    acts_a, acts_b = (_relu_outputs(one, mnist_dir, s) for s in ("dense_a", "dense_b"))
    for group, p in pi1.items():
        q = pi2[group]
        differ = p != q  # position i of B gets A's unit p[i] or q[i]
        dead_a, dead_b = (acts[group].std(0) == 0 for acts in (acts_a, acts_b))
        arbitrary = (
            dead_b | (dead_a[p] & dead_a[q]) | _alike(acts_a[group][:, p], acts_a[group][:, q])
        )
        assert not (differ & ~arbitrary).any(), group
    # pi(m_A) may differ in rows of never-firing units, so "permuted" trains another mask
    for stage in ("dense_a", "dense_b", "sparse/lth_s0.5_k1", "sparse/naive_s0.5_k1"):
        w1, w2 = (load_checkpoint(d / stage / "last.pt")["model"] for d in (s1, s2))
        for k in w1:
            scale = w1[k].abs().max().item()  # measured: dense 2e-8, sparse LTH up to 7e-4
            assert (w1[k] - w2[k]).abs().max().item() <= 1e-3 * scale, (stage, k)
    for r1, r2 in zip(_rows(one), _rows(two), strict=True):
        key = ("method", "sparsity", "rewind")
        assert [r1[k] for k in key] == [r2[k] for k in key]
        assert abs(r1["acc_mean"] - r2["acc_mean"]) <= 1.0, (r1, r2)  # <= 3 of 300 test images
    log = (two / "run.log").read_text()
    assert "2 processes" in log and log.count("dense B: test acc") == 1  # rank 0 logs alone


@pytest.mark.outcome
def test_weight_matching_gives_the_same_permutation(tmp_path, mnist_dir):
    """Weight matching needs no data, so no unit is arbitrary: 1 and 2 processes find the same
    permutation, and pi(m_A) differs from one process's only where m_A does."""
    weight = ("--match", "weight", "--epochs", "2", "--interp-points", "2")
    _run(_cli(tmp_path / "one", mnist_dir, 1, *weight))
    _run(_cli(tmp_path / "two", mnist_dir, 2, *weight))
    one, two = (tmp_path / d / "seed0" for d in ("one", "two"))
    pi1, pi2 = (Permutation.load(d / "align/pi.safetensors") for d in (one, two))
    assert pi1 == pi2
    flips = _assert_masks_agree(*(d / "masks/imp_s0.5.safetensors" for d in (one, two)))
    assert (
        _assert_masks_agree(*(d / "masks/permuted_s0.5.safetensors" for d in (one, two))) == flips
    )


def _assert_masks_agree(path_1: Path, path_2: Path) -> int:
    """Two runs' masks are the same but for a few weights at the pruning threshold; returns how
    many differ. The runs' weights are equal up to float summation order (gloo sums the
    ranks' gradients, one process the whole batch), and a sample crossing a ReLU's kink can
    amplify that to 1e-5 within an epoch; a magnitude cut then flips the weights that sit at
    the threshold (up to 84 of 930,816 entries seen, on either CPU kernel set). A rank that
    pruned by its own weights or data would change far more than 0.1%."""
    m1, m2 = load_mask(path_1), load_mask(path_2)
    assert m1.keys() == m2.keys()
    assert sum(m.sum() for m in m1.values()) == sum(m.sum() for m in m2.values())  # IMP's count
    flips = sum(int((m1[k] != m2[k]).sum()) for k in m1)
    assert flips <= 1e-3 * sum(m.numel() for m in m1.values()), flips
    return flips


def test_masked_entries_stay_zero_under_two_processes(one_and_two):
    _, two = one_and_two
    sd = two / "seed0"
    for method in ("lth", "permuted", "naive"):
        name = "imp" if method != "permuted" else "permuted"
        mask = load_mask(sd / "masks" / f"{name}_s0.5.safetensors")
        weights = load_checkpoint(sd / "sparse" / f"{method}_s0.5_k1" / "last.pt")["model"]
        for k, m in mask.items():
            assert not weights[k][~m].any(), (method, k)


def _worker_pid(launcher: subprocess.Popen, rank: int, timeout: float = 60) -> int:
    """The pid of torchrun's worker process with ``RANK=rank`` (from /proc)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{launcher.pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                try:
                    env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                if f"RANK={rank}".encode() in env:
                    return int(child)
        time.sleep(0.05)
    raise AssertionError(f"no worker with RANK={rank} under torchrun")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_a_killed_rank_ends_the_run_and_the_rerun_resumes(tmp_path, mnist_dir, one_and_two):
    """SIGKILL rank 1 inside dense B's training: rank 0 fails within the collective timeout
    (torchrun exits non-zero); the same command again resumes and ends with the results of the
    uninterrupted two-process run; resumed by one process instead, it finishes too."""
    _, two = one_and_two
    out = tmp_path / "killed"
    cmd = _cli(out, mnist_dir, 2, "--dist-timeout", "60")
    launcher = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        rank1 = _worker_pid(launcher, 1)
        last = out / "seed0" / "dense_b" / "last.pt"
        deadline = time.monotonic() + 240
        while not last.exists():
            assert launcher.poll() is None, "the run ended before dense B's first checkpoint"
            assert time.monotonic() < deadline, "dense B never checkpointed"
            time.sleep(0.01)
        os.kill(rank1, signal.SIGKILL)
        killed_at = time.monotonic()
        launcher.wait(timeout=120)
        waited = time.monotonic() - killed_at
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0 and waited < 60, (launcher.returncode, waited)
    assert load_checkpoint(last)["epoch"] < 3
    assert not (out / "seed0" / "dense_b" / "eval.pt").exists()
    shutil.copytree(out, tmp_path / "one_process")
    _run(cmd)
    assert "resumed at epoch" in (out / "run.log").read_text()
    assert _rows(out) == _rows(two)
    for stage in ("dense_b", "sparse/permuted_s0.5_k1"):
        a = load_checkpoint(two / "seed0" / stage / "last.pt")["model"]
        b = load_checkpoint(out / "seed0" / stage / "last.pt")["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), stage

    # the same interrupted run resumed by one process (same global batch): it finishes, close
    one = tmp_path / "one_process"
    _run(_cli(one, mnist_dir, 1, "--dist-timeout", "60"))
    assert "resumed at epoch" in (one / "run.log").read_text()
    for r1, r2 in zip(_rows(one), _rows(two), strict=True):
        assert abs(r1["acc_mean"] - r2["acc_mean"]) <= 1.0, (r1, r2)


def test_resnet50_imagenet_example_under_torchrun(tmp_path):
    """The ImageNet example end to end under torchrun, 2 CPU processes, on a tiny generated
    ImageFolder (4 classes, 6 + 3 images of 40x48 each), streamed at crop 32, a few steps per
    stage, bf16 autocast as in the recipe."""
    data = write_image_folder(tmp_path / "imagenet")
    out = tmp_path / "r50"
    tiny = ["--epochs", "2", "--rewind", "1", "--warmup-epochs", "1", "--sparsity", "0.2",
            "--finetune-epochs", "1", "--crop", "32", "--batch-size", "8", "--workers", "1",
            "--threads", "1", "--device", "cpu", "--interp-points", "2", "--match-batches", "2",
            "--no-progress"]  # fmt: skip
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
    ]
    example = [str(ROOT / "examples" / "resnet50_imagenet.py"), str(data), "--out", str(out)]
    start = time.monotonic()
    proc = _run([*launch, *example, *tiny])
    assert time.monotonic() - start < 300
    assert proc.stdout.count("| permuted | 20% | 1 | 1 |") == 1  # the table, from rank 0 only
    saved = (out / "config.yaml").read_text()
    assert "model: tv:resnet50" in saved and "schedule: step" in saved and "amp: bf16" in saved
    mask = load_mask(out / "seed0" / "masks" / "permuted_s0.2.safetensors")
    weights = load_checkpoint(out / "seed0" / "sparse" / "permuted_s0.2_k1" / "last.pt")["model"]
    assert all(not weights[k][~m].any() for k, m in mask.items())
    assert "2 processes" in (out / "run.log").read_text()
