"""Training-step time with MaskedOptimizer and with torch.nn.utils.prune, relative to dense.

One step = zero_grad + forward + backward + optimizer step, same model, data and initial weights
for the four variants: dense, MaskedOptimizer as constructed by default ("masked"; for SGD and
AdamW it skips the post-step pass, see permask/sparse/optimizer.py), MaskedOptimizer with
``post_step_mask=True`` ("always"), and torch prune's forward pre-hook ("prune"). Variants are
interleaved block by block, rotating their order, and the ratio is the median over repeats of
(variant block time / dense block time of the same repeat), which cancels slow machine drift.

    .venv/bin/python benchmarks/masked_step.py [--repeats 7] [--steps 4] [--models resnet20 mlp]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from permask.models import resnet20
from permask.sparse import MaskedOptimizer, apply_mask, magnitude_mask, to_torch_prune

TARGETS = {"SGD": 1.03, "AdamW": 1.08, "AdamW fused": 1.08}
OPTIMIZERS = {
    "SGD": lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4),
    "AdamW": lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01),
    # torch's fused CPU kernel: no separate sqrt pass, which is slow on zeros (docs/benchmarks.md)
    "AdamW fused": lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=True),
}


def mlp() -> nn.Module:
    """784-1024x4-10."""
    layers, width = [], 784
    for _ in range(4):
        layers += [nn.Linear(width, 1024), nn.ReLU()]
        width = 1024
    return nn.Sequential(*layers, nn.Linear(width, 10))


MODELS = {
    "resnet20": ("ResNet20 (CIFAR, batch 64)", resnet20, (64, 3, 32, 32)),
    "mlp": ("MLP 784-1024x4-10 (batch 128)", mlp, (128, 784)),
}


def make_steps(
    factory: Callable[[], nn.Module],
    shape: tuple[int, ...],
    make_opt: Callable,
    sparsity: float,
    device: torch.device,
) -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    base = factory().to(device)
    mask = magnitude_mask(base, sparsity)
    x = torch.randn(shape, device=device)
    y = torch.randint(0, 10, (shape[0],), device=device)
    loss_fn = nn.CrossEntropyLoss()

    dense = copy.deepcopy(base)
    masked = copy.deepcopy(base)
    apply_mask(masked, mask)
    always = copy.deepcopy(masked)
    pruned = copy.deepcopy(base)
    to_torch_prune(pruned, mask)
    setups = {
        "dense": (dense, make_opt(dense.parameters())),
        "masked": (masked, MaskedOptimizer(make_opt(masked.parameters()), mask, masked)),
        "always": (
            always,
            MaskedOptimizer(make_opt(always.parameters()), mask, always, post_step_mask=True),
        ),
        "prune": (pruned, make_opt(pruned.parameters())),
    }

    def step_fn(model: nn.Module, opt: torch.optim.Optimizer) -> Callable[[], None]:
        def step() -> None:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()

        return step

    return {name: step_fn(*setup) for name, setup in setups.items()}


def measure(
    steps: dict[str, Callable[[], None]], repeats: int, n: int, device: torch.device
) -> dict[str, list[float]]:
    def sync() -> None:  # a GPU block ends when its queued kernels do
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for step in steps.values():  # warm-up (allocations, optimizer state)
        for _ in range(3):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync()
            t0 = time.perf_counter()
            for _ in range(n):
                steps[name]()
            sync()
            times[name].append((time.perf_counter() - t0) / n)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=4, help="steps per timed block")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {where}, {torch.get_num_threads()} threads\n")

    print(
        "| model | optimizer | dense ms/step | masked ms/step | masked/dense | always/dense "
        "| prune/dense | target (masked/dense) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for model_name, factory, shape in (MODELS[m] for m in args.models):
        for opt_name, make_opt in OPTIMIZERS.items():
            steps = make_steps(factory, shape, make_opt, args.sparsity, device)
            t = measure(steps, args.repeats, args.steps, device)

            def ratio(name: str, t=t) -> float:
                return statistics.median(a / b for a, b in zip(t[name], t["dense"]))

            ms = {name: 1e3 * statistics.median(v) for name, v in t.items()}
            target = TARGETS[opt_name]
            verdict = "met" if ratio("masked") <= target else "MISSED"
            print(
                f"| {model_name} | {opt_name} | {ms['dense']:.1f} | {ms['masked']:.1f} | "
                f"{ratio('masked'):.3f} | {ratio('always'):.3f} | {ratio('prune'):.3f} | "
                f"<= {target} ({verdict}) |",
                flush=True,
            )


if __name__ == "__main__":
    main()
