"""Import time of permask and permask.sparse against torch alone, measured in this run.

Each import runs in a fresh interpreter, interleaved, ``--repeats`` times; medians are printed,
with the extra cost over ``import torch`` and whether timm or torch._dynamo were loaded (neither
should be: timm's rules load on the first trace). Usage: ``python benchmarks/import_time.py``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

MODULES = ["torch", "permask", "permask.sparse"]


def once(module: str) -> tuple[float, bool]:
    code = f"import {module}, sys; print('timm' in sys.modules or 'torch._dynamo' in sys.modules)"
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return time.perf_counter() - start, out.stdout.strip() == "True"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    once("torch")  # warm the file cache
    times: dict[str, list[float]] = {m: [] for m in MODULES}
    heavy: dict[str, bool] = {}
    for _ in range(args.repeats):
        for m in MODULES:
            t, loaded = once(m)
            times[m].append(t)
            heavy[m] = heavy.get(m, False) or loaded
    base = statistics.median(times["torch"])
    print("| import | median s | over torch (s) | timm or dynamo loaded |")
    print("|---|---|---|---|")
    for m in MODULES:
        med = statistics.median(times[m])
        print(f"| {m} | {med:.2f} | {med - base:+.2f} | {'yes' if heavy[m] else 'no'} |")


if __name__ == "__main__":
    main()
