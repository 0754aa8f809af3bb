"""What a ``permask run`` would do and how long it would take: :func:`plan`.

Contract: ``plan(exp)`` lists every stage of ``exp``'s run (the list of
:func:`permask.experiment.stages.stages`, which the pipeline runs), in order, seed by seed: its
epochs and optimizer steps, whether it is done already (skipped on resume) or resumes part-way,
and its estimated wall time on this device.
The times come from a :class:`Probe`, a few timed steps of the run's own model, batch sizes,
loaders and training loop (about 10 s on two CPU cores for a ResNet20), not from a table.
Nothing is written; the run directory is only read.

Example (``permask run ... --plan`` prints the same)::

    from permask.experiment import RunConfig
    from permask.experiment.plan import plan
    from permask.experiment.prepare import prepare

    exp = prepare(RunConfig(model="mlp", dataset="mnist", epochs=2))
    print(plan(exp))                # a table of stages, then the total

What the estimate leaves out: gradient all-reduce under torchrun (the probe trains one process
alone), a slower learning of a streamed loader's first batches, and the difference between the
random-init models the probe aligns and trained ones (trained pairs give easier assignment
problems, so alignment is overestimated rather than under).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from permask.experiment.paths import imp_round_dir
from permask.experiment.prepare import Experiment
from permask.experiment.stages import Stage as RunStage
from permask.experiment.stages import stages
from permask.experiment.train import checkpoint_path
from permask.match import align
from permask.metrics import _reset_bn, evaluate
from permask.sparse import imp_sparsities

__all__ = ["Probe", "StageEstimate", "RunPlan", "measure", "plan"]


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
class StageEstimate:
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
    needs: tuple[str, ...] = ()  # the keys (seed<s>/<name>) of the stages it waits for

    @property
    def key(self) -> str:
        return f"seed{self.seed}/{self.name}"

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
class RunPlan:
    """The stages of a run and the probe that times them (``None`` when nothing is left)."""

    stages: list[StageEstimate]
    probe: Probe | None
    device: str = "cpu"
    jobs: int = 1  # stages at once (``--jobs``)

    @property
    def todo(self) -> list[StageEstimate]:
        return [s for s in self.stages if not s.done]

    @property
    def seconds(self) -> float:
        """Estimated wall time of the stages still to run."""
        return sum(s.seconds(self.probe) for s in self.todo) if self.probe else 0.0

    def _cost(self, s: StageEstimate) -> float:
        return 0.0 if s.done or self.probe is None else s.seconds(self.probe)

    def critical_path(self) -> tuple[float, list[str]]:
        """The longest chain of stages through their needs: its estimated seconds and keys (a
        run takes at least this long whatever ``jobs`` is)."""
        best: dict[str, tuple[float, list[str]]] = {}
        longest: tuple[float, list[str]] = (0.0, [])
        for s in self.stages:  # declared order: every need comes earlier
            before = (0.0, [])
            for n in s.needs:  # the first of equally long chains
                if n in best and best[n][0] > before[0]:
                    before = best[n]
            best[s.key] = (before[0] + self._cost(s), [*before[1], s.key])
            if best[s.key][0] > longest[0]:
                longest = best[s.key]
        return longest

    def seconds_with(self, jobs: int) -> float:
        """Estimated wall time with ``jobs`` stages at once, each taking its estimate: whenever a
        lane is free, the first stage in declared order whose needs are done starts, as
        :mod:`permask.experiment.jobs` starts them."""
        waiting, finish = list(self.stages), {}
        running: list[tuple[float, str]] = []  # (finish time, key)
        now = 0.0
        while waiting or running:
            started = True
            while started and len(running) < max(1, jobs):
                started = False
                for s in waiting:
                    if all(finish.get(n, float("inf")) <= now for n in s.needs):
                        waiting.remove(s)
                        running.append((now + self._cost(s), s.key))
                        started = True
                        break
            if not running:  # needs outside the plan: nothing can start
                break
            running.sort()
            now, key = running.pop(0)
            finish[key] = now
        return now

    def summary(self) -> str:
        """One line: stages to run, the estimate, and what the probe measured."""
        head = f"{len(self.todo)} of {len(self.stages)} stages to run"
        if self.probe is None:
            return head
        p = self.probe
        estimate = _duration(self.seconds)
        if self.jobs > 1:
            critical = _duration(self.critical_path()[0])
            estimate = (f"{_duration(self.seconds_with(self.jobs))} with {self.jobs} jobs "
                        f"({estimate} one at a time; critical path {critical})")  # fmt: skip
        return (f"{head}, estimated {estimate} on {self.device} (probe: "
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
        path = " -> ".join(self.critical_path()[1])
        return "\n".join([*lines, "", self.summary(), f"Critical path: {path}"])


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
    loader = exp.train_loader.replace(max_batches=steps)
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


def plan(exp: Experiment, probe: Probe | None = None) -> RunPlan:
    """Every stage of ``exp``'s run with its state and work left, timed by ``probe`` (measured
    now if not given and some stage is left); see the module docstring."""
    run_stages = stages(exp.cfg)
    planned = [replace(COSTS[s.kind](exp, s), needs=s.needs) for s in run_stages]
    if probe is None and any(not s.done for s in planned):
        probe = measure(exp)
    jobs = 1 if exp.world.active else exp.cfg.jobs
    return RunPlan(planned, probe, str(exp.cfg.device), jobs)


def _done(stage: RunStage) -> StageEstimate | None:
    """The plan's row of a finished stage (all its outputs there), else None."""
    if all(path.exists() for path in stage.outputs):
        return StageEstimate(stage.seed, stage.name, "done")
    return None


def _training(exp: Experiment, stage: RunStage) -> StageEstimate:
    """A training in its directory from epoch ``start_epoch`` to ``epochs``, then its two test
    passes (accuracy, and the saved softmax)."""
    if done := _done(stage):
        return done
    start = stage.start_epoch
    trained = max(_epochs_done(stage.directory), start)
    state = f"resumes at epoch {trained}" if trained > start else "to run"
    left = stage.epochs - trained
    steps, tests = left * len(exp.train_loader), 2 * len(exp.test_loader)
    return StageEstimate(stage.seed, stage.name, state, left, steps, tests)


def _imp(exp: Experiment, stage: RunStage) -> StageEstimate:
    """IMP: one training per round (fine-tuning, or rewinding to k), evaluations at targets."""
    if done := _done(stage):
        return done
    cfg = exp.cfg
    rounds = len(imp_sparsities(cfg.sparsity, rate=cfg.imp_rate))
    finetune = cfg.imp == "finetune"
    per_round, start = (cfg.finetune_epochs, 0) if finetune else (cfg.epochs, cfg.rewind[0])
    a_dir = stage.directory.parent
    dirs = [imp_round_dir(a_dir, r) for r in range(1, rounds + 1)]
    left = sum(per_round - max(_epochs_done(d), start) for d in dirs)
    tests = 2 * len(cfg.sparsity) * len(exp.test_loader)
    return StageEstimate(
        stage.seed, stage.name, "to run", left, left * len(exp.train_loader), tests
    )


def _align(exp: Experiment, stage: RunStage) -> StageEstimate:
    """One alignment: its fixed cost, and a data pass over ``match_batches`` (activation)."""
    if done := _done(stage):
        return done
    available = len(exp.statistics_loader(shard=True))
    batches = min(exp.cfg.match_batches or available, available)
    return StageEstimate(stage.seed, stage.name, align_batches=batches, aligns=1)


def _interpolation(exp: Experiment, stage: RunStage) -> StageEstimate:
    """2 x points - 2 models (the curves share their ends), each with BatchNorm re-estimated on
    ``interp_bn_samples`` training images and evaluated on the test set."""
    if done := _done(stage):
        return done
    cfg = exp.cfg
    points = max(2 * cfg.interp_points - 2, 0)
    train_images = len(exp.train_loader.labels)
    bn_images = min(cfg.interp_bn_samples or train_images, train_images)
    n_test = len(exp.test_loader)
    tests = min(cfg.interp_batches or n_test, n_test)
    bn = bn_images / exp.test_loader.batch_size
    return StageEstimate(
        stage.seed, stage.name, test_batches=points * tests, bn_batches=points * bn
    )


def _bookkeeping(exp: Experiment, stage: RunStage) -> StageEstimate:
    """A stage that only moves a few tensors (pi(m_A)): no work a probe would time."""
    return _done(stage) or StageEstimate(stage.seed, stage.name)


# The work left of each kind of stage (permask.experiment.stages), in units a Probe times.
COSTS: dict[str, Callable[[Experiment, RunStage], StageEstimate]] = {
    "dense": _training,
    "imp": _imp,
    "align": _align,
    "permuted masks": _bookkeeping,
    "sparse": _training,
    "interpolation": _interpolation,
}


def _epochs_done(directory: Path) -> int:
    """Completed epochs of the training checkpointed in ``directory`` (0 if none yet)."""
    path = checkpoint_path(directory)
    if not path.exists():
        return 0
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"])
