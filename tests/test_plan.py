"""``permask run --plan``: every stage with its state and a measured estimate, nothing written;
every shipped config plans; a run logs its plan and records estimates beside actual times."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from shared_data import write_image_folder

from permask.cli import _parser, main
from permask.experiment import RunConfig, pipeline, run
from permask.experiment.config import config_from_flags
from permask.experiment.plan import Probe, plan
from permask.experiment.recipes import shipped_configs

_TINY = dict(model="mlp", dataset="mnist", train_subset=600, test_subset=200, epochs=2, seeds=1,
             sparsity=[0.5], rewind=[1], threads=1, progress=False, device="cpu")  # fmt: skip
# seconds per unit: a training step, a test batch, a BatchNorm batch, an alignment batch, one
# alignment's fixed cost, the probe itself
_PROBE = Probe(0.5, 1.0, 1.0, 2.0, 10.0, 0.0)


_LISTS = ("sparsity", "rewind", "progress")


def _names(p) -> list[str]:
    return [s.name for s in p.stages]


def test_plan_lists_every_stage_with_its_work_and_writes_nothing(mnist_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", "--plan", "--out", str(out), "--data-dir", str(mnist_dir)]
    argv += [f"--{k.replace('_', '-')}={v}" for k, v in _TINY.items() if k not in _LISTS]
    assert main([*argv, "--sparsity", "0.5", "0.8", "--rewind", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert not out.exists()  # nothing written
    assert "| 0 | dense A | to run | 2 | 10 |" in printed  # 600 images / 128 per batch: 5 steps
    assert "| 0 | lth s=0.8 k=1 | to run | 1 | 5 |" in printed  # k=1 of 2 epochs: one left
    assert "| 0 | permuted masks | to run | 0 | 0 |" in printed
    assert "12 of 12 stages to run, estimated" in printed and "ms per training step" in printed


def test_plan_counts_imp_rounds_and_each_schedule(mnist_dir, tmp_path):
    cfg = RunConfig(**_TINY, data_dir=str(mnist_dir), out=str(tmp_path / "r"))
    exp = pipeline.prepare(replace(cfg, sparsity=[0.5], imp_rate=0.2, finetune_epochs=3))
    stages = {s.name: s for s in plan(exp, _PROBE).stages}
    assert stages["IMP"].epochs == 4 * 3  # 0.2, 0.36, 0.488, 0.5: four rounds of 3 epochs
    assert stages["naive s=0.5 k=1"].epochs == 1
    assert stages["interpolation"].test_batches == 20 * 1  # 2 x 11 - 2 points, 1 test batch
    # 600 training images; the test batch is 1000: each point's BatchNorm pass is 0.6 batch
    assert stages["interpolation"].bn_batches == pytest.approx(20 * 0.6)
    assert stages["align"].seconds(_PROBE) == 10.0 + 2.0 * 1  # fixed + one statistics batch
    restart = pipeline.prepare(replace(cfg, epochs=4, rewind=[1], sparse_schedule="restart"))
    assert {s.name: s for s in plan(restart, _PROBE).stages}["lth s=0.5 k=1"].epochs == 3
    shared = pipeline.prepare(replace(cfg, seeds=2, shared_a=True))
    assert _names(plan(shared, _PROBE)).count("dense A") == 1  # seed 0's A serves seed 1


def test_a_run_logs_its_plan_and_records_estimates_and_times(mnist_dir, tmp_path):
    cfg = RunConfig(**_TINY, data_dir=str(mnist_dir), out=str(tmp_path / "r"))
    run(cfg)
    log = (cfg.run_dir / "run.log").read_text()
    assert "plan: 9 of 9 stages to run, estimated" in log
    stages = json.loads((cfg.run_dir / "results.json").read_text())["stages"]
    assert [s["stage"] for s in stages] == _names(plan(pipeline.prepare(cfg), _PROBE))
    assert all(s["seconds"] > 0 for s in stages)
    work = [s for s in stages if s["stage"] != "permuted masks"]  # it moves a few tensors: 0
    assert len(work) == 8 and all(s["estimate_seconds"] > 0 for s in work)
    assert "estimated" in (cfg.run_dir / "results.md").read_text()
    done = plan(pipeline.prepare(cfg))  # all done: no probe is measured
    assert done.probe is None and not done.todo and "0 of 9 stages to run" in str(done)
    (cfg.run_dir / "seed0" / "interpolation.json").unlink()
    again = plan(pipeline.prepare(cfg), _PROBE)
    assert [s.name for s in again.todo] == ["interpolation"]


@pytest.fixture(scope="module")
def paper_data(tmp_path_factory):
    """CIFAR-10/100 as JPEG folders (a few 32 x 32 images per class) and an ImageNet folder."""
    root = tmp_path_factory.mktemp("paper_data")
    for name, classes in (("cifar10", 10), ("cifar100", 100)):
        write_image_folder(root / name, classes, 2, (32, 32), splits=("train", "test"))
    write_image_folder(root / "imagenet", 3, 2, (64, 64))
    return root


@pytest.mark.parametrize("name", list(shipped_configs()))
def test_every_shipped_config_plans(name, paper_data):
    argv = ["run", "--config", name, "--data-dir", str(paper_data), "--device", "cpu"]
    if "imagenet" in name:
        argv += ["--dataset", f"imagefolder:{paper_data / 'imagenet'}", "--workers", "0"]
    cfg = config_from_flags(_parser().parse_args(argv))
    p = plan(pipeline.prepare(cfg), _PROBE)
    a_seeds = 1 if cfg.shared_a else cfg.seeds  # dense A and IMP
    # B, align, pi(m_A), the sparse trainings, interpolation
    per_seed = 4 + len(cfg.methods) * len(cfg.sparsity) * len(cfg.rewind)
    assert len(p.stages) == 2 * a_seeds + cfg.seeds * per_seed and len(p.todo) == len(p.stages)
    for s in p.stages:
        if " k=" in s.name:  # a sparse training, either schedule: epochs - k left
            assert s.epochs == cfg.epochs - int(s.name.rsplit("k=", 1)[1])
    assert p.seconds > 0


def test_critical_path_and_the_estimate_for_n_jobs():
    """Dense A (10 s) -> IMP (20 s) -> LTH (5 s) is the critical path; dense B (10 s) and the
    other stages fit beside it with 2 jobs."""
    from permask.experiment.plan import RunPlan, StageEstimate

    probe = Probe(1.0, 0.0, 0.0, 0.0, 0.0, 0.0)  # a stage's estimate = its steps

    def st(name, steps, *needs):
        return StageEstimate(0, name, steps=steps, needs=tuple(f"seed0/{n}" for n in needs))

    stages = [st("dense A", 10), st("IMP", 20, "dense A"), st("dense B", 10),
              st("align", 2, "dense A", "dense B"), st("lth", 5, "dense A", "IMP"),
              st("permuted", 5, "dense B", "IMP", "align"),
              st("naive", 5, "dense B", "IMP")]  # fmt: skip
    one = RunPlan(stages, probe)
    assert one.critical_path() == (35.0, ["seed0/dense A", "seed0/IMP", "seed0/lth"])
    assert one.seconds == one.seconds_with(1) == 57.0
    assert one.seconds_with(2) == 40.0  # A|B, IMP|align, then lth|permuted, naive
    assert one.seconds_with(8) == 35.0  # the critical path
    two = RunPlan(stages, probe, jobs=2)
    assert "estimated 40 s with 2 jobs (57 s one at a time; critical path 35 s)" in two.summary()
    assert str(two).endswith("Critical path: seed0/dense A -> seed0/IMP -> seed0/lth")
