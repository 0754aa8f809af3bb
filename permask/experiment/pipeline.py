"""The paper's experiment, resumable stage by stage: :func:`run`.

Per seed (names as in the paper): dense A from w_A^0 keeping the rewind points k; IMP on A ->
m_A at every requested sparsity; dense B from w_B^0; align A to B -> pi; sparse training from k
of LTH (w_A^k * m_A), permuted (w_B^k * pi(m_A)) and naive (w_B^k * m_A) with the same recipe;
the interpolation curves A -> B and pi(A) -> B. Then the report (see
:mod:`permask.experiment.report`). The stages, what each needs and writes, are declared once in
:mod:`permask.experiment.stages`; this module runs them with their runners
(:mod:`permask.experiment.runners`).

Every stage writes into the run directory atomically (models through :func:`train`'s checkpoints,
each trained model's test softmax in ``eval.pt``, masks and permutations as safetensors; the
layout: :mod:`permask.experiment.paths`). A stage reads what it needs from the files of the
stages before it, so a stage whose outputs exist is skipped, and an interrupted training resumes
from its last epoch checkpoint with identical results.
"""

from __future__ import annotations

import time
from typing import Any

import yaml

from permask._atomic import atomic_write_bytes
from permask.experiment.config import ConfigError, RunConfig
from permask.experiment.jobs import run_jobs
from permask.experiment.plan import RunPlan, plan
from permask.experiment.prepare import Experiment, attach_log, prepare
from permask.experiment.report import Results, collect, write_report
from permask.experiment.stages import stages

__all__ = ["run", "prepare", "Experiment"]


def run(cfg: RunConfig) -> Results:
    """Run (or resume) the whole experiment; return the results table (also written to disk)."""
    exp = prepare(cfg)
    start = time.perf_counter()
    out, world = cfg.run_dir, exp.world
    if world.main:  # rank 0 alone writes the run directory and the log
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # a file there, no permission, a read-only file system
            raise ConfigError(f"cannot create the run directory {out}: {err}") from None
        saved = yaml.safe_dump(cfg.results_key(), sort_keys=False)
        atomic_write_bytes(saved.encode(), out / "config.yaml")
    handler = attach_log(exp.log, out / "run.log" if world.main else None)
    world.barrier()
    try:
        exp.log.info(
            "run %s: %s on %s, %d seed(s), device %s%s",
            out, cfg.model, cfg.dataset, cfg.seeds, exp.cfg.device,
            f", {world.size} processes" if world.active else "",
        )  # fmt: skip
        todo = plan(exp)
        exp.log.info("plan: %s", todo.summary())
        run_jobs(exp, stages(exp.cfg), log_path=out / "run.log" if world.main else None)
        results = collect(out, cfg, exp.test_loader.labels.cpu(), exp.num_classes)
        results.stages = _stage_times(todo, exp.timings)
        if world.main:
            write_report(out, cfg, results, time.perf_counter() - start)
        world.barrier()
        for note in results.notes:
            exp.log.warning(note)
        exp.log.info(
            "results in %s (%.1f min this invocation)",
            out / "results.md",
            (time.perf_counter() - start) / 60,
        )
    finally:
        exp.log.removeHandler(handler)
        handler.close()
    return results


def _stage_times(todo: RunPlan, timings: dict[tuple[int, str], float]) -> list[dict[str, Any]]:
    """Each stage this invocation ran: the plan's estimate beside the time it took."""
    return [
        {"seed": s.seed, "stage": s.name, "estimate_seconds": s.seconds(todo.probe),
         "seconds": timings.get((s.seed, s.name))}
        for s in todo.todo
    ]  # fmt: skip
