"""Trace time of the two front ends on the same models: torch.export / torch.fx, in one run.

    .venv/bin/python benchmarks/trace_time.py [--models resnet18 vit_tiny_patch16_224 ...]

Default models: the timm subset of tests/test_graph_timm.py (one small model per family, at its
test input size). Each model is traced with ``frontend="fx"`` and ``frontend="export"``,
alternating, best of 2 each (the first timm/torch warm-up is done before the clock); prints one
row per model, whether both give the same groups (member sets), the fraction of parameters each
moves, the largest relative output
change of a float64 copy under 2 random permutations of the export graph (outside the clock;
~1e-15 is exact, anything large a corruption), and the median ratio.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

import timm
import torch

import permask
from permask.testing import equivalence_error, perturb_

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_graph_timm import SUBSET  # noqa: E402


def _groups(graph) -> list:
    return sorted((g.size, sorted((m.tensor, m.axis) for m in g.members)) for g in graph)


def _change(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Largest relative output change of a perturbed float64 copy, 2 random permutations."""
    work = perturb_(copy.deepcopy(model).double().eval(), seed=0)
    xd = x.double()
    graph = permask.trace(work, xd, frontend="export")
    gen = torch.Generator().manual_seed(0)
    return max(
        equivalence_error(work, xd, permask.random_permutation(graph, gen), graph) for _ in range(2)
    )


def _make(name: str, side: int) -> torch.nn.Module:
    try:
        return timm.create_model(name, num_classes=10, img_size=side)
    except TypeError:
        return timm.create_model(name, num_classes=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SUBSET))
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    permask.trace(torch.nn.Linear(2, 2), torch.randn(1, 2), frontend="export")  # warm-up
    print("| model | fx (s) | export (s) | export / fx | same groups | parameters moved fx / "
          "export | export: output change |")  # fmt: skip
    print("|---" * 7 + "|")
    ratios = []
    for name in args.models:
        side = SUBSET.get(name, 32)
        model = _make(name, side).eval()
        x = torch.randn(2, 3, side, side)
        best = {"fx": float("inf"), "export": float("inf")}
        graphs = {}
        for _ in range(2):
            for frontend in best:
                t = time.perf_counter()
                graphs[frontend] = permask.trace(model, x, frontend=frontend)
                best[frontend] = min(best[frontend], time.perf_counter() - t)
        ratio = best["export"] / best["fx"]
        ratios.append(ratio)
        same = _groups(graphs["fx"]) == _groups(graphs["export"])
        change = _change(model, x)
        moved = " / ".join(f"{graphs[f].permutable_fraction:.1%}" for f in ("fx", "export"))
        print(f"| {name} | {best['fx']:.2f} | {best['export']:.2f} | {ratio:.1f} | {same} | "
              f"{moved} | {change:.1e} |", flush=True)  # fmt: skip
    print(f"\nmedian export / fx: {statistics.median(ratios):.1f} over {len(ratios)} models")


if __name__ == "__main__":
    main()
