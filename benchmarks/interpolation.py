"""The interpolation stage of a finished ``permask run``, as before 2026-12-04 against now.

Before: both curves computed in full (2 x points), BatchNorm re-estimated over the whole
training set at each point, models in the contiguous layout (the old default). Now: the
pipeline's own stage with today's defaults (``interp_bn_samples`` images in equal batches, the
shared ends computed once, ``channels_last`` models and images), run into a temp dir. Both on
the run's seed-0 checkpoints, one after the other in this process; prints both times, their
ratio and the barriers.

Usage: ``python benchmarks/interpolation.py RUN_DIR [--bn-samples N] [--no-channels-last]``
(set PERMASK_DATA as for the run). docs/benchmarks.md, "Interpolation stage", records its
figures.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from permask import permute_model
from permask.experiment import RunConfig, pipeline, runners
from permask.experiment.config import read_run_config
from permask.experiment.train import checkpoint_path, load_checkpoint
from permask.graph import Permutation
from permask.metrics import interpolate

DEFAULTS = RunConfig()


def _models(exp: pipeline.Experiment, seed_dir: Path):
    a, b = exp.build(0), exp.build(0)
    load_checkpoint(checkpoint_path(seed_dir / "dense_a"), a)
    load_checkpoint(checkpoint_path(seed_dir / "dense_b"), b)
    return a, b


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--bn-samples", type=int, default=DEFAULTS.interp_bn_samples)
    p.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, default=DEFAULTS.channels_last
    )
    args = p.parse_args()
    cfg = read_run_config(args.run_dir)
    exp = pipeline.prepare(replace(cfg, channels_last=False))
    seed_dir = args.run_dir / "seed0"
    pi = Permutation.load(seed_dir / "align" / "pi.safetensors")

    a, b = _models(exp, seed_dir)
    t0 = time.perf_counter()
    common = dict(alphas=exp.cfg.interp_points, bn_loader=exp.statistics_loader(),
                  device=exp.cfg.device, max_batches=exp.cfg.interp_batches)  # fmt: skip
    before = {
        "naive": interpolate(a, b, exp.test_loader, **common),
        "permuted": interpolate(permute_model(a, pi, exp.graph), b, exp.test_loader, **common),
    }
    before_s = time.perf_counter() - t0

    now_cfg = replace(cfg, interp_bn_samples=args.bn_samples, channels_last=args.channels_last)
    exp = pipeline.prepare(now_cfg)
    a, b = _models(exp, seed_dir)
    now = runners._curves(exp, a, b, pi)

    layout = "channels_last" if args.channels_last else "contiguous"
    n = cfg.interp_points
    print("| stage | seconds | barrier naive | barrier permuted |")
    print("|---|---|---|---|")
    print(f"| before: all training images, {2 * n} points, contiguous | {before_s:.1f} | "
          f"{before['naive']['barrier']:.4f} | {before['permuted']['barrier']:.4f} |")  # fmt: skip
    print(f"| now: {args.bn_samples} images, {2 * n - 2} points, {layout} | {now['seconds']:.1f} | "
          f"{now['naive']['barrier']:.4f} | {now['permuted']['barrier']:.4f} |")  # fmt: skip
    print(f"now / before: {now['seconds'] / before_s:.3f}")
    for name in ("naive", "permuted"):
        diff = max(abs(x - y) for x, y in zip(before[name]["losses"], now[name]["losses"]))
        print(f"{name}: largest change of a point's loss {diff:.4f}")


if __name__ == "__main__":
    main()
