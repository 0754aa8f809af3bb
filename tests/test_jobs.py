"""--jobs N: a run's stages as concurrent worker processes (permask.experiment.jobs). The files
are the same as one process's, a SIGKILLed run resumes to the same results, and a failing job
stops the run with its own error."""

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
from shared_data import TINY_RUN, assert_same_run_files, sigkill_once_written, tiny_flags

from permask.experiment import RunConfig, run
from permask.experiment.stages import stages

ROOT = Path(__file__).resolve().parents[1]


def _table(run_dir: Path) -> dict:
    """results.json without its timings."""
    blob = json.loads((run_dir / "results.json").read_text())
    for key in ("wall_seconds", "interpolation_seconds", "stages"):
        blob.pop(key)
    for row in blob["rows"]:
        row.pop("train_seconds")
    return blob


def _assert_same_files(cfg: RunConfig, other: Path) -> None:
    assert_same_run_files(cfg.run_dir, other, stages(cfg))


@pytest.fixture(scope="module")
def one_job(tmp_path_factory, mnist_dir):
    """The tiny run in one process (the reference)."""
    cfg = RunConfig(**TINY_RUN, data_dir=str(mnist_dir), out=str(tmp_path_factory.mktemp("j1")))
    run(cfg)
    return cfg


@pytest.mark.parametrize("model", ["mlp", "resnet20"])
def test_two_jobs_write_the_files_of_one(tmp_path, mnist_dir, one_job, model):
    """Bit-identical on the CPU at one thread per job: an MLP, and a BatchNorm CNN."""
    small = {} if model == "mlp" else dict(model="resnet20", train_subset=300, test_subset=100,
                                           seeds=1, interp_points=3)  # fmt: skip
    settings = {**TINY_RUN, **small, "data_dir": str(mnist_dir)}
    if model == "mlp":
        ref = one_job
    else:
        ref = RunConfig(**settings, out=str(tmp_path / "one"))
        run(ref)
    two = RunConfig(**settings, jobs=2, out=str(tmp_path / "two"))
    run(two)
    assert _table(two.run_dir) == _table(ref.run_dir)
    _assert_same_files(ref, two.run_dir)
    log = (two.run_dir / "run.log").read_text()
    assert "jobs: up to 2 at once, 1 thread(s) each" in log
    assert log.count("dense B: test acc") == two.seeds  # each job logs its own lines, named


def test_sigkill_with_two_jobs_in_flight_then_resume(tmp_path, mnist_dir, one_job):
    flags = tiny_flags(mnist_dir, jobs=2)
    cmd = [sys.executable, "-m", "permask", "run", *flags, "--out", str(tmp_path / "k")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # dense A and dense B of seed 0 both start at once: kill when B has its first epoch
    last = tmp_path / "k" / "seed0" / "dense_b" / "last.pt"
    deadline = time.monotonic() + 120
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    workers = _children(proc.pid)
    sigkill_once_written(proc, last, timeout=1)
    assert len(workers) >= 2 and not (tmp_path / "k" / "results.json").exists()
    deadline = time.monotonic() + 10  # the workers die with the run: no orphan writes on
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers)
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
    assert _table(tmp_path / "k") == _table(one_job.run_dir)
    _assert_same_files(one_job, tmp_path / "k")


def _children(pid: int) -> list[int]:
    return [int(c) for t in Path(f"/proc/{pid}/task").iterdir()
            for c in (t / "children").read_text().split()]  # fmt: skip


def _alive(pid: int) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def test_a_failing_job_stops_the_run_with_its_error_and_the_fix_resumes(
    tmp_path, mnist_dir, one_job, capsys
):
    from permask.cli import main

    out = tmp_path / "f"
    flags = [*tiny_flags(mnist_dir, jobs=2), "--out", str(out)]
    assert main(["run", *flags]) == 0
    broken = out / "seed1" / "masks" / "permuted_s0.5.safetensors"
    broken.write_bytes(b"not a safetensors file")  # the permuted stage reads it
    shutil.rmtree(out / "seed1" / "sparse" / "permuted_s0.5_k1")  # to be run again
    capsys.readouterr()
    assert main(["run", *flags]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("permask run: error: job 'seed1/permuted s=0.5 k=1' failed: ")
    assert (out / "seed1" / "sparse" / "naive_s0.5_k1" / "eval.pt").exists()  # stays done
    broken.unlink()  # the fix: pi(m_A) is made again from m_A and pi
    assert main(["run", *flags]) == 0
    assert _table(out) == _table(one_job.run_dir)


def test_a_worker_killed_from_outside_ends_the_run_with_one_line(tmp_path, mnist_dir):
    """The OOM killer's case: a worker dies; the run stops, naming the jobs that were running."""
    cmd = [sys.executable, "-m", "permask", "run", *tiny_flags(mnist_dir, jobs=2), "--out",
           str(tmp_path / "w")]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    last = tmp_path / "w" / "seed0" / "dense_a" / "last.pt"
    deadline = time.monotonic() + 120
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    workers = [w for w in _children(proc.pid) if "spawn_main" in _cmdline(w)]
    assert workers, "no worker found"
    os.kill(workers[0], signal.SIGKILL)
    lines = proc.communicate(timeout=120)[1].splitlines()
    assert proc.returncode == 1
    (err,) = [line for line in lines if line.startswith("permask run: error:")]
    assert err.startswith("permask run: error: a worker process died (killed, or out of memory)")
    assert "seed0/dense" in err


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""
