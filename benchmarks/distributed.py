"""Epoch time of ``train`` with 2 processes (torchrun, gloo, CPU) against 1 process, same run.

The model is the tiny BatchNorm CNN of the tests (ResNet20 x1 on 32x32 RGB, random uint8 images
in memory, global batch 128, SGD). Variants, each a fresh process (group) timed on epochs 2..E
(the first epoch pays start-up): 1 process with 1 thread, 1 process with 2 threads, and
2 processes with 1 thread each (``train(distributed=True)``, each its share of every batch).
Printed: median epoch seconds and ratios against the 1-process 2-thread run (the fair
comparison on a 2-core machine: both use both cores).

    .venv/bin/python benchmarks/distributed.py [--epochs 4] [--images 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch


def worker(epochs: int, images: int, threads: int) -> None:
    torch.set_num_threads(threads)
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1:
        torch.distributed.init_process_group("gloo")
    from permask.data.loader import TensorLoader
    from permask.experiment.train import train
    from permask.models import resnet20

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 10, (images,), generator=gen)
    rank = int(os.environ.get("RANK", "0"))
    loader = TensorLoader(x, y, batch_size=128, shuffle=True, augment=True, rank=rank,
                          world_size=size)  # fmt: skip
    torch.manual_seed(0)
    model = resnet20(1)
    result = train(model, loader, epochs=epochs, lr=0.05, progress=False, distributed=size > 1)
    if rank == 0:
        print(json.dumps([h["seconds"] for h in result.history]))


def measure(nproc: int, threads: int, args) -> float:
    script = [str(Path(__file__).resolve()), "--worker", "--threads", str(threads),
              "--epochs", str(args.epochs), "--images", str(args.images)]  # fmt: skip
    if nproc == 1:
        cmd = [sys.executable, *script]
    else:
        launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
        cmd = [sys.executable, *launch, *script]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    seconds = json.loads(out.strip().splitlines()[-1])
    return statistics.median(seconds[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.epochs, args.images, args.threads)
    runs = {
        "1 process, 1 thread": measure(1, 1, args),
        "1 process, 2 threads": measure(1, 2, args),
        "2 processes, 1 thread each": measure(2, 1, args),
    }
    base = runs["1 process, 2 threads"]
    print(f"ResNet20 x1, {args.images} images of 32x32, global batch 128, {os.cpu_count()} CPUs")
    for name, sec in runs.items():
        print(f"  {name:28s} {sec:6.2f} s/epoch   ratio {sec / base:.2f}")


if __name__ == "__main__":
    main()
