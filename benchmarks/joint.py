"""Weight matching before and after the joint updates of nested structured groups (issue 15).

Times ``permask.align(a, b, method="weight")`` on random-init pairs of a plain architecture
(torchvision resnet50) and grouped ones (torchvision resnext50_32x4d; timm regnetx_002 when timm
is installed), with this checkout's code ("after") and with the code of ``--base`` ("before", a
git worktree of that revision imported in a subprocess), in one run, alternating, best of
``--repeats``. Prints seconds, sweeps, objectives and after/before per model. The joint update
must not make plain models slower (target: resnet50 ratio about 1).

Usage: ``python benchmarks/joint.py [--base 099b864^] [--repeats 2]``; results in
docs/benchmarks.md, "Joint updates of structured groups".
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

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("tv:resnet50", "tv:resnext50_32x4d", "timm:regnetx_002")


def _build(name: str, seed: int):
    import torch

    torch.manual_seed(seed)
    lib, arch = name.split(":")
    if lib == "tv":
        import torchvision

        return getattr(torchvision.models, arch)().eval()
    import timm

    return timm.create_model(arch).eval()


def worker(name: str) -> dict:
    """One timed weight matching of ``name`` with the permask importable here."""
    import torch

    import permask

    torch.set_num_threads(2)
    a, b = _build(name, 0), _build(name, 1)
    graph = permask.trace(a, torch.randn(1, 3, 64, 64))
    t = time.perf_counter()
    _, info = permask.align(a, b, method="weight", graph=graph, return_info=True)
    return {"seconds": time.perf_counter() - t, "sweeps": info.iterations,
            "objective": info.objective, "permask": permask.__file__}  # fmt: skip


def _run(name: str, tree: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, __file__, "--worker", name]
    out = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not Path(result["permask"]).is_relative_to(tree):  # the other checkout was imported
        raise RuntimeError(f"{result['permask']} imported instead of {tree}'s permask")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="099b864^", help="git revision of the 'before' code")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return
    base = Path(tempfile.mkdtemp()) / "base"
    subprocess.run(["git", "worktree", "add", "-q", "--detach", str(base), args.base],
                   cwd=ROOT, check=True)  # fmt: skip
    try:
        print("| model | before s | after s | after / before | sweeps | objective before / after |")
        print("|---|---|---|---|---|---|")
        for name in args.models:
            runs = {"before": [], "after": []}
            for _ in range(args.repeats):  # alternating: drift hits both alike
                runs["before"].append(_run(name, base))
                runs["after"].append(_run(name, ROOT))
            b, a = (min(r, key=lambda x: x["seconds"]) for r in (runs["before"], runs["after"]))
            print(f"| {name} | {b['seconds']:.2f} | {a['seconds']:.2f} | "
                  f"{a['seconds'] / b['seconds']:.2f} | {b['sweeps']} / {a['sweeps']} | "
                  f"{b['objective']:.1f} / {a['objective']:.1f} |", flush=True)  # fmt: skip
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=True)


if __name__ == "__main__":
    main()
