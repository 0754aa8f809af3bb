"""End-to-end pipeline on a small subset of MNIST-format digits: artifacts, skipping, SIGKILL
resume (synthetic digits, tests/shared_data.py: every checkout runs these)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from shared_data import TINY_RUN, sigkill_once_written

from permask.experiment import RunConfig, run
from permask.experiment.train import load_checkpoint
from permask.metrics import barrier
from permask.sparse import imp_sparsities, load_mask, sparsity

ROOT = Path(__file__).resolve().parents[1]
_TINY = TINY_RUN  # tests/shared_data.py


def test_imp_sparsities_land_on_every_target():
    s = imp_sparsities([0.97, 0.5, 0.9], rate=0.2)
    assert s[:3] == pytest.approx([0.2, 0.36, 0.488])
    assert all(t in s for t in (0.5, 0.9, 0.97)) and s[-1] == 0.97
    assert all(b > a for a, b in zip(s, s[1:]))
    steps = [(b - a) / (1 - a) for a, b in zip([0.0, *s], s)]
    assert max(steps) <= 0.2 + 1e-12


@pytest.fixture(scope="module")
def tiny(mnist_dir):
    """The tiny run's settings, on the generated MNIST-format data."""
    return {**_TINY, "data_dir": str(mnist_dir)}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny):
    out = tmp_path_factory.mktemp("run") / "tiny"
    cfg = RunConfig(**tiny, out=str(out))
    return cfg, run(cfg)


@pytest.mark.outcome
def test_tiny_run_writes_every_artifact(tiny_run):
    cfg, results = tiny_run
    out = cfg.run_dir
    assert not results.notes  # the models learned: no chance-level warning
    for name in (
        "results.md",
        "results.csv",
        "results.json",
        "accuracy.png",
        "interpolation.png",
        "run.log",
        "config.yaml",
    ):
        assert (out / name).is_file(), name
    for seed in (0, 1):
        sd = out / f"seed{seed}"
        assert (sd / "align" / "pi.safetensors").is_file()
        m_a = load_mask(sd / "masks" / "imp_s0.5.safetensors")
        m_p = load_mask(sd / "masks" / "permuted_s0.5.safetensors")
        assert sparsity(m_a).overall == pytest.approx(0.5, abs=1e-6)
        assert sparsity(m_p).overall == sparsity(m_a).overall
        for stage in (
            "dense_a",
            "dense_b",
            "imp/s0.5",
            *(f"sparse/{m}_s0.5_k1" for m in ("lth", "permuted", "naive")),
        ):
            assert (sd / stage / "eval.pt").is_file(), stage
        assert (sd / "dense_a" / "epoch_1.pt").is_file()
        curves = json.loads((sd / "interpolation.json").read_text())
        for curve in curves["naive"], curves["permuted"]:  # the barrier is its own curve's
            assert curve["barrier"] == barrier(curve["alphas"], curve["losses"])
        for end in (0, -1):  # computed once: pi(A) is A's function, B is B
            assert curves["permuted"]["losses"][end] == curves["naive"]["losses"][end]
        assert curves["seconds"] > 0 and curves["bn_samples"] == RunConfig().interp_bn_samples
    methods = [(r["method"], r["sparsity"], r["rewind"]) for r in results.rows]
    assert methods == [
        ("dense", None, None),
        ("imp", 0.5, None),
        ("lth", 0.5, 1),
        ("permuted", 0.5, 1),
        ("naive", 0.5, 1),
    ]
    assert all(r["models"] == 2 for r in results.rows)
    assert "| permuted | 50% | 1 | 2 |" in results.markdown()
    assert "Interpolation stage: " in results.markdown() and len(results.interpolation_seconds) == 2
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("method,sparsity,rewind") and len(csv_lines) == 6


def test_sparse_models_keep_their_masks(tiny_run):
    cfg, _ = tiny_run
    sd = cfg.run_dir / "seed0"
    mask = load_mask(sd / "masks" / "permuted_s0.5.safetensors")
    ckpt = load_checkpoint(sd / "sparse" / "permuted_s0.5_k1" / "last.pt")
    for name, m in mask.items():
        assert not ckpt["model"][name][~m].any(), name
    meta = ckpt["meta"]  # default: the dense schedule resumed at k
    assert (meta["start_epoch"], meta["epochs"], meta["lr"]) == (1, cfg.epochs, cfg.lr)


def test_rerun_skips_finished_stages(tiny_run):
    cfg, first = tiny_run
    evals = sorted(cfg.run_dir.glob("seed*/**/eval.pt"))
    stamps = {p: p.stat().st_mtime_ns for p in evals}
    lines_before = len((cfg.run_dir / "run.log").read_text().splitlines())
    again = run(cfg)
    assert {p: p.stat().st_mtime_ns for p in evals} == stamps
    new_lines = (cfg.run_dir / "run.log").read_text().splitlines()[lines_before:]
    stage_lines = [ln for ln in new_lines if "[seed" in ln]
    assert stage_lines and all("done earlier (skipped)" in ln for ln in stage_lines)
    assert again.rows == first.rows


def test_sigkill_mid_training_resumes_to_identical_results(tmp_path, tiny):
    """Kill the CLI (SIGKILL) inside dense B's training; the rerun must equal a clean run."""
    settings = {**tiny, "train_subset": 2000, "epochs": 3, "seeds": 1, "interp_points": 3}
    ref = run(RunConfig(**settings, out=str(tmp_path / "ref")))
    killed = tmp_path / "killed"
    args = [sys.executable, "-m", "permask", "run", "--out", str(killed)]
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else f"--no-{flag[2:]}")
        else:
            args += [flag, *map(str, value if isinstance(value, list) else [value])]
    last = killed / "seed0" / "dense_b" / "last.pt"
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sigkill_once_written(proc, last, timeout=120)
    assert load_checkpoint(last)["epoch"] < settings["epochs"]
    assert not (killed / "seed0" / "dense_b" / "eval.pt").exists()
    subprocess.run(args, cwd=ROOT, check=True, capture_output=True)
    assert "resumed at epoch" in (killed / "run.log").read_text()
    got = json.loads((killed / "results.json").read_text())["rows"]
    assert [_no_time(r) for r in got] == [_no_time(r) for r in ref.rows]  # NaN-safe: JSON text
    for stage in ("dense_b", "sparse/permuted_s0.5_k1"):
        a = load_checkpoint(tmp_path / "ref" / "seed0" / stage / "last.pt")["model"]
        b = load_checkpoint(killed / "seed0" / stage / "last.pt")["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), stage


def _no_time(row: dict) -> str:
    return json.dumps({k: v for k, v in row.items() if k != "train_seconds"})


def test_variants_rewinding_imp_shared_a_weight_matching_early_match_bf16(tmp_path, tiny):
    settings = {**tiny, "train_subset": 500, "imp": "rewind", "shared_a": True,
                "match": "weight", "match_epoch": 1, "interp_points": 3,
                "sparse_schedule": "restart", "sparse_lr": 0.02, "amp": "bf16"}  # fmt: skip
    results = run(RunConfig(**settings, out=str(tmp_path / "v")))
    assert results.row("imp", 0.5)["models"] == 1  # one shared A
    assert results.row("lth", 0.5, 1)["models"] == 2
    assert not (tmp_path / "v" / "seed1" / "dense_a").exists()
    ckpt = load_checkpoint(tmp_path / "v" / "seed0" / "imp" / "round01" / "last.pt")
    assert ckpt["meta"]["start_epoch"] == 1  # rewinding IMP retrains from k
    sparse = load_checkpoint(tmp_path / "v" / "seed0" / "sparse" / "naive_s0.5_k1" / "last.pt")
    meta = sparse["meta"]  # a fresh cosine over the remaining epochs at sparse_lr (the paper)
    assert (meta["start_epoch"], meta["epochs"], meta["lr"]) == (0, tiny["epochs"] - 1, 0.02)
    assert meta["amp"] == "bf16"  # every training of the run under bf16 autocast
    mask = load_mask(tmp_path / "v" / "seed0" / "masks" / "imp_s0.5.safetensors")
    assert all(not sparse["model"][k][~m].any() for k, m in mask.items())
    assert "amp: bf16" in (tmp_path / "v" / "config.yaml").read_text()


def test_a_run_whose_models_did_not_learn_says_so(tmp_path, tiny):
    settings = {**tiny, "train_subset": 200, "test_subset": 200, "epochs": 1, "seeds": 1,
                "rewind": [0], "lr": 1e-9, "finetune_lr": 1e-9, "interp_points": 2}  # fmt: skip
    results = run(RunConfig(**settings, out=str(tmp_path / "stuck")))
    assert len(results.notes) == 1 and "near chance (10.0%)" in results.notes[0]
    assert "**Warning:** dense B reached only" in (tmp_path / "stuck" / "results.md").read_text()
    assert "near chance" in (tmp_path / "stuck" / "run.log").read_text()


def test_more_methods_and_sparseopt_join_a_finished_run(tmp_path, tiny):
    """The paper's three, then the sign methods, then SparseOpt, into one run directory: each
    invocation trains only its new sparse stages and the report shows every finished row."""
    settings = {**tiny, "interp_points": 2}
    out = tmp_path / "run"
    first = run(RunConfig(**settings, out=str(out)))
    evals = {p: p.stat().st_mtime_ns for p in out.glob("seed*/**/eval.pt")}
    every = ["lth", "permuted", "naive", "naive+signs", "permuted+signs"]
    second = run(RunConfig(**settings, methods=every, out=str(out)))
    assert {p: p.stat().st_mtime_ns for p in evals} == evals  # nothing trained again
    assert [r["method"] for r in second.rows] == ["dense", "imp", *every]
    assert second.rows[:5] == first.rows  # the same rows, then the new ones
    assert all(r["models"] == 2 for r in second.rows[5:])
    third = run(RunConfig(**settings, methods=["permuted"], sparse_precondition="sparseopt",
                          out=str(out)))  # fmt: skip
    assert [r["method"] for r in third.rows] == ["dense", "imp", *every, "permuted/sparseopt"]
    assert third.row("permuted/sparseopt", 0.5, 1) != third.row("permuted", 0.5, 1)
    reported = (out / "results.md").read_text()
    assert "| permuted+signs | 50% | 1 | 2 |" in reported
    assert "| permuted/sparseopt | 50% | 1 | 2 |" in reported


def test_the_sign_methods_start_from_b_magnitudes_with_a_signs(tmp_path, tiny):
    """naive+signs starts from |w_B^k| with the signs of w_A^k and m_A; permuted+signs from
    |w_B^k| with the signs of pi(w_A^k) and pi(m_A); zero outside the mask."""
    from permask.experiment.prepare import prepare
    from permask.experiment.runners import sparse_start
    from permask.experiment.stages import stages
    from permask.graph import Permutation
    from permask.permute import permute_tensors

    every = ["lth", "permuted", "naive", "naive+signs", "permuted+signs"]
    settings = {**tiny, "seeds": 1, "interp_points": 2, "methods": every}
    cfg = RunConfig(**settings, out=str(tmp_path / "r"))
    run(cfg)
    exp = prepare(cfg)
    starts = {s.method: sparse_start(exp, s) for s in stages(cfg) if s.kind == "sparse"}
    pi = Permutation.load(cfg.run_dir / "seed0" / "align" / "pi.safetensors")
    a = starts["lth"][0].state_dict()  # w_A^k
    moved_a = permute_tensors(a, pi, exp.graph)
    for method, plain, signs in (
        ("naive+signs", "naive", a),
        ("permuted+signs", "permuted", moved_a),
    ):
        (model, mask), (model_b, mask_b) = starts[method], starts[plain]
        assert mask.keys() == mask_b.keys()
        assert all(torch.equal(mask[n], mask_b[n]) for n in mask)  # m_A, or pi(m_A)
        w, b = model.state_dict(), model_b.state_dict()  # b: w_B^k
        for name, keep in mask.items():
            assert torch.equal(w[name][keep].abs(), b[name][keep].abs()), (method, name)
            same = torch.signbit(w[name][keep]) == torch.signbit(signs[name][keep])
            assert same.all(), (method, name)
            assert not w[name][~keep].any()
            assert not torch.equal(w[name], b[name] * keep)  # some signs did change
