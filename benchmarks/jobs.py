"""Wall time of ``permask demo`` with ``--jobs N`` against ``--jobs 1``, measured in one run.

Each variant runs the whole demo from an empty run directory in a fresh process (the real
command line), one after another, on the same machine; the printed ratio is jobs-N wall time /
jobs-1 wall time (target: <= 0.75 for N = 2 on two cores). Both run at their defaults: --jobs 1
with torch's threads, --jobs N with those threads split between the jobs. The tables are equal
only at the same threads per job (float summation order; tests/test_jobs.py checks that case),
so here the script prints both and says whether they are equal.

    PERMASK_DATA=../shared/data .venv/bin/python benchmarks/jobs.py [--jobs 2] [-- extra flags]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _demo(out: Path, jobs: int, extra: list[str]) -> tuple[float, list[dict]]:
    cmd = [sys.executable, "-m", "permask", "demo", "--out", str(out), "--jobs", str(jobs),
           "--no-progress", *extra]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    rows = json.loads((out / "results.json").read_text())["rows"]
    return seconds, [{k: v for k, v in r.items() if k != "train_seconds"} for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("extra", nargs="*", help="more flags for both runs, after --")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="permask-jobs-"))
    one, rows_one = _demo(root / "one", 1, args.extra)
    many, rows_many = _demo(root / "many", args.jobs, args.extra)
    print(f"machine: {os.cpu_count()} cores; permask demo {' '.join(args.extra)}")
    print(f"--jobs 1: {one:.1f} s; --jobs {args.jobs}: {many:.1f} s; ratio {many / one:.2f}")
    print("results equal:", rows_one == rows_many)
    for a, b in zip(rows_one, rows_many):
        print(f"  {a['method']:9s} {a['sparsity'] or '':5} {a['rewind'] or '':3} "
              f"{a['acc_mean']:.2f} {b['acc_mean']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
