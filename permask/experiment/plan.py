"""What a ``permask run`` would do and how long it would take: :func:`plan`.

Contract: ``plan(exp)`` lists every stage :func:`permask.experiment.pipeline.run` would run for
``exp``'s config, in order, seed by seed: its epochs and optimizer steps, whether it is done
already (skipped on resume) or resumes part-way, and its estimated wall time on this device.
The times come from a :class:`Probe`, a few timed steps of the run's own model, batch sizes,
loaders and training loop (about 10 s on two CPU cores for a ResNet20), not from a table.
Nothing is written; the run directory is only read.

Example (``permask run ... --plan`` prints the same)::

    from permask.experiment import RunConfig, pipeline
    from permask.experiment.plan import plan

    exp = pipeline.prepare(RunConfig(model="mlp", dataset="mnist", epochs=2))
    print(plan(exp))                # a table of stages, then the total

What the estimate leaves out: gradient all-reduce under torchrun (the probe trains one process
alone), a slower learning of a streamed loader's first batches, and the difference between the
random-init models the probe aligns and trained ones (trained pairs give easier assignment
problems, so alignment is overestimated rather than under).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from permask.experiment import pipeline
from permask.experiment.layout import (
    a_seed,
    align_path,
    eval_path,
    imp_files,
    imp_round_dir,
    interpolation_path,
    seed_dir,
    sparse_dir,
)
from permask.experiment.pipeline import Experiment
from permask.experiment.train import checkpoint_path
from permask.match import align
from permask.metrics import _reset_bn, evaluate
from permask.sparse import imp_sparsities

__all__ = ["Probe", "Stage", "Plan", "measure", "plan"]


@dataclass(frozen=True)
class Probe:
    """Seconds per unit of work, measured on this device with the run's settings."""

    train_step: float  # one optimizer step at the run's batch size (loader included)
    test_batch: float  # one eval-mode batch of the test loader
    bn_batch: float  # one train-mode forward (BatchNorm statistics) at the test batch size
    align_batch: float  # one batch of the alignment's data pass (0 for weight matching)
    align_fixed: float  # the alignment's cost that does not grow with data (LAPs, tracing)
    seconds: float  # the probe's own wall time


@dataclass(frozen=True)
class Stage:
    """One stage of one seed and the work it has left, in units a :class:`Probe` times:
    ``steps`` optimizer steps (over ``epochs`` epochs), ``test_batches`` eval-mode test batches,
    ``bn_batches`` train-mode forwards (in test-batch sizes), ``align_batches`` batches of an
    alignment's data pass and ``aligns`` alignments (their fixed cost)."""

    seed: int
    name: str
    state: str = "to run"  # "to run", "done", or "resumes at epoch N"
    epochs: int = 0
    steps: int = 0
    test_batches: int = 0
    bn_batches: float = 0.0
    align_batches: int = 0
    aligns: int = 0

    @property
    def done(self) -> bool:
        return self.state == "done"

    def seconds(self, probe: Probe) -> float:
        """Estimated wall time of the work left."""
        p = probe
        return (self.steps * p.train_step + self.test_batches * p.test_batch
                + self.bn_batches * p.bn_batch + self.align_batches * p.align_batch
                + self.aligns * p.align_fixed)  # fmt: skip


@dataclass
class Plan:
    """The stages of a run and the probe that times them (``None`` when nothing is left)."""

    stages: list[Stage]
    probe: Probe | None
    device: str = "cpu"

    @property
    def todo(self) -> list[Stage]:
        return [s for s in self.stages if not s.done]

    @property
    def seconds(self) -> float:
        """Estimated wall time of the stages still to run."""
        return sum(s.seconds(self.probe) for s in self.todo) if self.probe else 0.0

    def summary(self) -> str:
        """One line: stages to run, the estimate, and what the probe measured."""
        head = f"{len(self.todo)} of {len(self.stages)} stages to run"
        if self.probe is None:
            return head
        p = self.probe
        return (f"{head}, estimated {_duration(self.seconds)} on {self.device} (probe: "
                f"{p.train_step * 1000:.0f} ms per training step, {p.test_batch * 1000:.0f} ms "
                f"per test batch; took {p.seconds:.1f} s)")  # fmt: skip

    def __str__(self) -> str:
        lines = [
            "| seed | stage | state | epochs | steps | estimate |",
            "|---|---|---|---|---|---|",
        ]
        for s in self.stages:
            est = "–" if s.done or self.probe is None else _duration(s.seconds(self.probe))
            lines.append(f"| {s.seed} | {s.name} | {s.state} | {s.epochs} | {s.steps} | {est} |")
        return "\n".join([*lines, "", self.summary()])


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def measure(exp: Experiment, steps: int = 3, batches: int = 2) -> Probe:
    """Time ``steps`` training steps, ``batches`` test batches, BatchNorm batches and alignment
    batches of ``exp``'s own model, each after one untimed warm-up; the run's RNG is untouched."""
    cfg, t0 = exp.cfg, time.perf_counter()
    cuda = [torch.device(cfg.device)] if torch.device(cfg.device).type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        model, dev = exp.build(0), cfg.device
        train_step = _each(lambda n: _train(exp, model, n), steps, len(exp.train_loader), dev)
        tests = exp.test_loader
        test = _each(lambda n: evaluate(model, tests, dev, n), batches, len(tests), dev)
        stats = exp.statistics_loader()
        bn = _each(lambda n: _reset_bn(model, stats, dev, n), batches, len(stats), dev)
        info = _align_info(exp, batches)
    per_batch = info.pass_seconds / info.batches if info.batches else 0.0
    fixed = max(info.seconds - info.pass_seconds, 0.0)
    return Probe(train_step, test, bn, per_batch, fixed, time.perf_counter() - t0)


def _each(work, n: int, available: int, device: str) -> float:
    """Seconds per item of ``work(n)`` (at most ``available`` items), after ``work(1)``."""
    work(1)
    n = max(1, min(n, available))
    _sync(device)
    t0 = time.perf_counter()
    work(n)
    _sync(device)
    return (time.perf_counter() - t0) / n


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _train(exp: Experiment, model: torch.nn.Module, steps: int) -> None:
    """``steps`` optimizer steps of the run's training loop (no checkpoints, no progress bar)."""
    loader = copy.copy(exp.train_loader)
    loader.max_batches = steps
    recipe = dict(epochs=1, progress=False, distributed=False)
    exp.fit(model, loader, None, "probe", **recipe)


def _align_info(exp: Experiment, batches: int):
    """The alignment of two fresh models on ``batches`` batches, with its :class:`AlignInfo`
    (its warnings about random-init models, e.g. dead channels, are not the user's: silenced)."""
    cfg = exp.cfg
    a, b = exp.build(1), exp.build(2)
    loader = exp.statistics_loader(shard=True)
    log = logging.getLogger("permask.match")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        _, info = align(a, b, loader, method=cfg.match, graph=exp.graph, max_batches=batches,
                        device=cfg.device, return_info=True)  # fmt: skip
    finally:
        log.setLevel(level)
    return info


def plan(exp: Experiment, probe: Probe | None = None) -> Plan:
    """Every stage of ``exp``'s run with its state and work left, timed by ``probe`` (measured
    now if not given and some stage is left); see the module docstring."""
    stages = [stage for seed in range(exp.cfg.seeds) for stage in _seed_stages(exp, seed)]
    if probe is None and any(not s.done for s in stages):
        probe = measure(exp)
    return Plan(stages, probe, str(exp.cfg.device))


def _seed_stages(exp: Experiment, seed: int) -> list[Stage]:
    """The stages of one seed in the order ``pipeline._run_seed`` runs them."""
    cfg = exp.cfg
    own, a_dir = seed_dir(cfg.run_dir, seed), seed_dir(cfg.run_dir, a_seed(cfg, seed))
    out = []
    if a_seed(cfg, seed) == seed:  # else seed 0's A and IMP serve this seed
        out += [_training(exp, seed, "dense A", a_dir / "dense_a", cfg.epochs)]
        out += [_imp(exp, seed, a_dir)]
    out += [_training(exp, seed, "dense B", own / "dense_b", cfg.epochs)]
    out += [_align(exp, seed, own)]
    for s in cfg.sparsity:
        for k in cfg.rewind:
            restart = cfg.sparse_schedule == "restart"  # else the dense schedule from k
            end, start = (cfg.epochs - k, 0) if restart else (cfg.epochs, k)
            for method in pipeline.METHODS:
                name, path = f"{method} s={s:g} k={k}", sparse_dir(own, method, s, k)
                out.append(_training(exp, seed, name, path, end, start))
    out.append(_interpolation(exp, seed, own))
    return out


def _training(
    exp: Experiment, seed: int, name: str, path: Path, epochs: int, start: int = 0
) -> Stage:
    """A training in ``path`` from epoch ``start`` to ``epochs``, then its two test passes
    (accuracy, and the saved softmax)."""
    if eval_path(path).exists():
        return Stage(seed, name, "done")
    done = max(_epochs_done(path), start)
    state = f"resumes at epoch {done}" if done > start else "to run"
    left = epochs - done
    return Stage(seed, name, state, left, left * len(exp.train_loader), 2 * len(exp.test_loader))


def _imp(exp: Experiment, seed: int, a_dir: Path) -> Stage:
    """IMP: one training per round (fine-tuning, or rewinding to k), evaluations at targets."""
    cfg = exp.cfg
    masks, evals = imp_files(cfg, a_dir)
    if all(path.exists() for path in [*masks.values(), *evals.values()]):
        return Stage(seed, "IMP", "done")
    rounds = len(imp_sparsities(cfg.sparsity, rate=cfg.imp_rate))
    finetune = cfg.imp == "finetune"
    per_round, start = (cfg.finetune_epochs, 0) if finetune else (cfg.epochs, cfg.rewind[0])
    dirs = [imp_round_dir(a_dir, r) for r in range(1, rounds + 1)]
    left = sum(per_round - max(_epochs_done(d), start) for d in dirs)
    tests = 2 * len(cfg.sparsity) * len(exp.test_loader)
    return Stage(seed, "IMP", "to run", left, left * len(exp.train_loader), tests)


def _align(exp: Experiment, seed: int, own: Path) -> Stage:
    """One alignment: its fixed cost, and a data pass over ``match_batches`` (activation)."""
    if align_path(own).exists():
        return Stage(seed, "align", "done")
    available = len(exp.statistics_loader(shard=True))
    batches = min(exp.cfg.match_batches or available, available)
    return Stage(seed, "align", align_batches=batches, aligns=1)


def _interpolation(exp: Experiment, seed: int, own: Path) -> Stage:
    """2 x points - 2 models (the curves share their ends), each with BatchNorm re-estimated on
    ``interp_bn_samples`` training images and evaluated on the test set."""
    cfg = exp.cfg
    if interpolation_path(own).exists():
        return Stage(seed, "interpolation", "done")
    points = max(2 * cfg.interp_points - 2, 0)
    train_images = len(exp.train_loader.labels)
    bn_images = min(cfg.interp_bn_samples or train_images, train_images)
    n_test = len(exp.test_loader)
    tests = min(cfg.interp_batches or n_test, n_test)
    bn = bn_images / exp.test_loader.batch_size
    return Stage(seed, "interpolation", test_batches=points * tests, bn_batches=points * bn)


def _epochs_done(directory: Path) -> int:
    """Completed epochs of the training checkpointed in ``directory`` (0 if none yet)."""
    path = checkpoint_path(directory)
    if not path.exists():
        return 0
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"])
