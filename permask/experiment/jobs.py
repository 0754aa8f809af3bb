"""A run's stages as concurrent jobs: :func:`run_jobs` runs up to ``cfg.jobs`` stages at once,
each in a worker process as soon as the stages it needs are done.

Contract: the files a run writes do not depend on ``jobs``: bit for bit on the CPU at the same
threads per job (``threads``), since a stage reads only the files of the stages it needs
(:mod:`permask.experiment.runners`) and every training seeds its own init and data order. With
``jobs=1``, or under torchrun, the stages run in this process one after another in the order
of :func:`~permask.experiment.stages.stages`. Otherwise ``jobs`` worker processes (spawned,
each with the run's data loaded and model traced once) take the ready stages in that order.

A failing job stops the run: the jobs in flight are ended and :class:`JobError` names the job
and its error; the files of finished jobs stay valid, and the same command resumes (a training
from its last epoch checkpoint). Workers end with the process that started them (Linux:
``PR_SET_PDEATHSIG``), so a killed run leaves no orphan writing into its directory.

Example (``permask run ... --jobs 2`` does the same)::

    from permask.experiment import RunConfig, run

    run(RunConfig(model="mlp", dataset="mnist", jobs=2, threads=1))
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from pathlib import Path

import torch

from permask.experiment.config import RunConfig
from permask.experiment.errors import JobError
from permask.experiment.prepare import Experiment, attach_log, prepare
from permask.experiment.runners import done_earlier, run_stage
from permask.experiment.stages import Stage, stages

__all__ = ["JobError", "run_jobs", "threads_per_job"]


def threads_per_job(cfg: RunConfig) -> int:
    """``threads`` if given, else this process's torch threads split evenly between the jobs."""
    if cfg.threads is not None:
        return cfg.threads
    return max(1, torch.get_num_threads() // cfg.jobs)


def run_jobs(exp: Experiment, run_stages: list[Stage], log_path: Path | None) -> None:
    """Run every stage of ``run_stages`` that is not done (see the module docstring)."""
    jobs = min(exp.cfg.jobs, len(run_stages))
    if jobs <= 1 or exp.world.active:
        for stage in run_stages:
            run_stage(exp, stage)
        return
    done = {s.key for s in run_stages if done_earlier(exp, s)}
    waiting = {s.key: s for s in run_stages if s.key not in done}
    cfg = replace(exp.cfg, threads=threads_per_job(exp.cfg), progress=False)
    jobs = min(jobs, len(waiting))  # a resume with few stages left starts few workers
    if not jobs:
        return
    exp.log.info("jobs: up to %d at once, %d thread(s) each", jobs, cfg.threads)
    start = (cfg, log_path, os.getpid())
    pool = ProcessPoolExecutor(jobs, multiprocessing.get_context("spawn"), _start_worker, start)
    running: dict[Future, Stage] = {}
    try:
        while waiting or running:
            for key, stage in list(waiting.items()):
                if len(running) < jobs and done.issuperset(stage.needs):
                    running[pool.submit(_work, key)] = waiting.pop(key)
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in sorted(finished, key=lambda f: running[f].key):
                stage = running.pop(future)
                if isinstance(future.exception(), BrokenProcessPool):  # a worker died
                    names = ", ".join(sorted(s.key for s in [stage, *running.values()]))
                    raise JobError(f"a worker process died (killed, or out of memory) while "
                                   f"running {names}")  # fmt: skip
                if future.exception() is not None:
                    err = future.exception()
                    exp.log.error("job '%s' failed", stage.key, exc_info=err)
                    error = " ".join(f"{type(err).__name__}: {err}".split())
                    raise JobError(f"job '{stage.key}' failed: {error}") from err
                if future.result() is not None:
                    exp.timings[(stage.seed, stage.name)] = future.result()
                done.add(stage.key)
    except BaseException:  # a failed job, an interrupt, a dead pool: end the jobs in flight
        _end(pool)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _end(pool: ProcessPoolExecutor) -> None:
    """End the workers now (their jobs in flight are lost; their files are written atomically)."""
    for process in list((pool._processes or {}).values()):  # no public way to stop a running job
        process.terminate()


# --- in a worker process ---

_exp: Experiment | None = None


def _start_worker(cfg: RunConfig, log_path: Path | None, parent: int) -> None:
    """Die with the parent, then load the run's data and trace its model once."""
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    global _exp
    _exp = prepare(cfg)
    attach_log(_exp.log, log_path)


def _work(key: str) -> float | None:
    """Run the stage ``key`` of this worker's run; its seconds (``None``: done already)."""
    assert _exp is not None, "a job ran in a process that was not started by run_jobs"
    stage = next(s for s in stages(_exp.cfg) if s.key == key)
    return run_stage(_exp, stage)
