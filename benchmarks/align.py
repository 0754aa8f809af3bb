"""Alignment benchmarks: activation-matching overhead, weight matching of ResNet50, LAP solvers.

    .venv/bin/python benchmarks/align.py                      # scipy only
    PYTHONPATH=/tmp/lapx_pkg .venv/bin/python benchmarks/align.py   # lapx from a separate dir

1. Activation matching time / time of plain eval of A and B over the same batches (random
   inputs, by default 32x32, batch 64, 4 batches; graph traced beforehand; best of 3 each,
   interleaved):
   the data pass alone (both forwards plus statistics: the per-data cost) and the total (plus
   correlations and the LAPs, a fixed cost that does not grow with the data).
2. Weight matching of two random-init torchvision resnet50s: seconds and sweeps.
3. LAP on correlation-like matrices (B = permuted A: one strong entry per row, weak noise
   elsewhere), scipy vs lapx (when importable), median of 3.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torchvision

import permask
from permask.match import align, available_solvers, solve_lap
from permask.models import resnet20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(f, device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    f()
    _sync(device)
    return time.perf_counter() - t


def activation_ratio(
    name: str, make, batch: int, batches: int, size: int, device: torch.device
) -> dict:
    torch.manual_seed(0)
    a = make().eval().to(device)
    torch.manual_seed(1)
    b = make().eval().to(device)
    data = [
        (torch.randn(batch, 3, size, size, device=device), torch.zeros(batch))
        for _ in range(batches)
    ]
    t = time.perf_counter()
    graph = permask.trace(a, data[0][0])
    t_trace = time.perf_counter() - t

    @torch.no_grad()
    def plain():
        for x, _ in data:
            a(x)
            b(x)

    passes = []

    def match():
        _, info = align(a, b, data, graph=graph, return_info=True)  # default solver
        passes.append(info.pass_seconds)
        return info

    plain(), match()  # warm-up
    t_plain = t_match = float("inf")
    for _ in range(3):  # interleaved, so that load changes hit both
        t_plain = min(t_plain, _seconds(plain, device))
        t_match = min(t_match, _seconds(match, device))
    info = match()
    t_pass = min(passes[1:])
    return dict(
        model=name, plain=t_plain, passed=t_pass, match=t_match, pass_ratio=t_pass / t_plain,
        ratio=t_match / t_plain, trace=t_trace, stats_mib=info.stats_bytes / 2**20,
    )  # fmt: skip


def weight_resnet50(device: torch.device) -> dict:
    torch.manual_seed(0)
    a = torchvision.models.resnet50().eval().to(device)
    torch.manual_seed(1)
    b = torchvision.models.resnet50().eval().to(device)
    graph = permask.trace(a, torch.randn(1, 3, 64, 64, device=device))
    res = {}
    for solver in available_solvers():
        if device.type == "cuda":  # CUDA context and kernels warmed outside the clock
            align(a, b, method="weight", graph=graph, solver=solver)
        _sync(device)
        t = time.perf_counter()
        _, info = align(a, b, method="weight", graph=graph, return_info=True, solver=solver)
        res[solver] = (time.perf_counter() - t, info.iterations, info.objective)
    return res


def correlation_like(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = 0.05 * rng.standard_normal((n, n))
    c[np.arange(n), rng.permutation(n)] += rng.uniform(0.3, 0.9, n)
    return np.clip(c, -1, 1)


def lap_times(sizes=(512, 2048, 4096)) -> list[dict]:
    rows = []
    for n in sizes:
        c = correlation_like(n)
        row = {"n": n}
        for solver in available_solvers():
            times = []
            for _ in range(3):
                t = time.perf_counter()
                cols = solve_lap(c, solver=solver)
                times.append(time.perf_counter() - t)
            row[solver] = statistics.median(times)
            row[solver + "_value"] = float(c[np.arange(n), cols.numpy()].sum())
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="where models, data and scores live")
    parser.add_argument("--batch", type=int, default=64, help="activation part: batch size")
    parser.add_argument("--batches", type=int, default=4, help="activation part: batches")
    parser.add_argument("--size", type=int, default=32, help="activation part: image side")
    parser.add_argument(
        "--tf32", action="store_true", help="allow TF32 matrix products (CUDA; off by default)"
    )
    parser.add_argument(
        "--parts", nargs="+", choices=["activation", "weight", "lap"],
        default=["activation", "weight", "lap"],
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {where}, {threads} threads, solvers {available_solvers()}")
    print(f"activation inputs: {args.batches} batches of {args.batch}x3x{args.size}x{args.size}")
    if device.type == "cuda":
        print(f"TF32 matrix products: {args.tf32}")
    if "activation" in args.parts:
        print(
            "\n| model | plain eval A+B (s) | data pass (s) | pass / plain | matching total (s) "
            "| total / plain | trace (s) | stats MiB |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for name, make in (
            ("ResNet20x4", lambda: resnet20(4)),
            ("ResNet50 (torchvision)", torchvision.models.resnet50),
        ):
            r = activation_ratio(name, make, args.batch, args.batches, args.size, device)
            print(
                f"| {r['model']} | {r['plain']:.2f} | {r['passed']:.2f} | {r['pass_ratio']:.2f} "
                f"| {r['match']:.2f} | {r['ratio']:.2f} | {r['trace']:.2f} | "
                f"{r['stats_mib']:.1f} |",
                flush=True,
            )
    if "weight" in args.parts:
        print("\n| weight matching resnet50 | seconds | sweeps | objective |\n|---|---|---|---|")
        for solver, (sec, sweeps, obj) in weight_resnet50(device).items():
            print(f"| solver={solver} | {sec:.2f} | {sweeps} | {obj:.4g} |", flush=True)
    if "lap" in args.parts:
        solvers = available_solvers()
        print("\n| n | " + " | ".join(f"{s} (s)" for s in solvers) + " | same optimum |")
        print("|---|" + "---|" * len(solvers) + "---|")
        for row in lap_times():
            same = len({round(row[s + "_value"], 6) for s in solvers}) == 1
            print(
                f"| {row['n']} | " + " | ".join(f"{row[s]:.3f}" for s in solvers) + f" | {same} |"
            )


if __name__ == "__main__":
    main()
