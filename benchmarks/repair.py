"""Bring your own checkpoints, end to end on the command line: barriers naive / aligned /
aligned + REPAIR, and the merge, with the wall time of each command (issue 16's measurement).

    .venv/bin/python benchmarks/repair.py [--data-dir ../shared/data] [--out runs/repair]

Two pairs of models are trained here from different seeds and saved as safetensors (the
"checkpoints a user brings"; a later run reuses them):

1. an MLP 784-512-512-512-10 on MNIST (SGD 0.05, momentum 0.9, 3 epochs, batch 128);
2. a norm-free VGG-style CNN (6 convs of 32 channels, ReLU, 2 max-pools, no BatchNorm) on
   Fashion-MNIST (Adam 1e-3, 2 epochs, batch 128): the kind of network REPAIR is for.

Then, as a user would, each through ``python -m permask``: ``align`` (activation matching, 50
batches), ``interpolate`` naive, aligned (``--perm``) and aligned with ``--repair`` (11 points,
whole test set, REPAIR statistics on 50 training batches), and ``merge`` with and without
``--repair``. Prints one markdown table per model with the loss barriers, the midpoint
accuracies and each command's seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def cnn(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    """6 convs of 32 channels (3x3, ReLU, bias), max-pools after the 2nd and 5th; no norm."""
    layers, c = [], in_channels
    for i in range(6):
        layers += [nn.Conv2d(c, 32, 3, padding=1), nn.ReLU()]
        c = 32
        if i in (1, 4):
            layers.append(nn.MaxPool2d(2))
    side = image_size // 4
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(32 * side * side, num_classes))


def _train(model: nn.Module, dataset: str, data_dir: str, seed: int, epochs: int, adam: bool):
    from permask.data.loader import get_loaders

    torch.manual_seed(seed)
    train, _, _ = get_loaders(dataset, data_dir, batch_size=128, augment=False, seed=seed,
                              download=False)  # fmt: skip
    opt = (torch.optim.Adam(model.parameters(), lr=1e-3) if adam
           else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))  # fmt: skip
    for epoch in range(epochs):
        train.set_epoch(epoch)
        for x, y in train:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


def _cli(*argv) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "permask", *map(str, argv)], cwd=ROOT,
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"permask {argv[0]} failed: {proc.stderr.strip()[-500:]}")
    return time.perf_counter() - start, proc.stdout


def measure(name: str, spec: list[str], dataset: str, data_dir: str, out: Path, make, adam, ep):
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for seed in (1, 2):
        path = out / f"{name}_seed{seed}.safetensors"
        files.append(path)
        if path.exists():  # trained by an earlier run of this script
            continue
        t = time.perf_counter()
        model = _train(make(), dataset, data_dir, seed, ep, adam)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
        print(f"trained {path.name} in {time.perf_counter() - t:.0f} s", flush=True)
    data = ["--data", dataset, "--data-dir", data_dir, "--batches", "50"]
    rows, seconds = {}, {}
    model, flags = spec[0], spec[1:]  # positionals first: --input-size takes what follows it
    seconds["align"], _ = _cli("align", model, *files, *flags, "--out", out / "pi.safetensors",
                               *data)  # fmt: skip
    for label, extra in (
        ("naive", []),
        ("aligned", ["--perm", out / "pi.safetensors"]),
        ("aligned + REPAIR", ["--perm", out / "pi.safetensors", "--repair"]),
    ):
        folder = out / label.replace(" + ", "_")
        seconds[f"interpolate {label}"], _ = _cli("interpolate", model, *files, *flags, *extra,
                                                  *data, "--out", folder)  # fmt: skip
        rows[label] = json.loads((folder / "interpolation.json").read_text())
    merged = {}
    for label, extra in (("merge", []), ("merge --repair", ["--repair"])):
        seconds[label], printed = _cli("merge", model, *files, *flags, *extra, *data,
                                       "--out", out / "merged.safetensors")  # fmt: skip
        merged[label] = printed.splitlines()[-2]  # the merged model's row
    print(f"\n### {name} ({dataset})\n")
    print("| path | loss barrier | acc barrier (points) | acc at alpha 0.5 | ends (acc) |")
    print("|---|---|---|---|---|")
    for label, r in rows.items():
        mid = r["accs"][len(r["accs"]) // 2]
        print(
            f"| {label} | {r['barrier']:.4f} | {100 * r['acc_barrier']:.2f} | "
            f"{100 * mid:.2f}% | {100 * r['accs'][0]:.2f}% / {100 * r['accs'][-1]:.2f}% |"
        )
    print("\n| merged model (loss, acc) |\n|---|")
    for label, row in merged.items():
        print(f"| {label}: {' '.join(row.split()[-2:])} |")
    print("\n| command | seconds |\n|---|---|")
    for label, s in seconds.items():
        print(f"| {label} | {s:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "repair"))
    parser.add_argument("--parts", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    if "mlp" in args.parts:
        spec = ["mlp", "--input-size", "1", "28", "28", "--model-kwargs",
                '{"hidden": [512, 512, 512]}']  # fmt: skip
        from permask.models import build_model

        make = lambda: build_model("mlp", 10, 1, 28, hidden=[512, 512, 512])  # noqa: E731
        measure("mlp", spec, "mnist", args.data_dir, out / "mlp", make, False, 3)
    if "cnn" in args.parts:
        spec = ["benchmarks.repair:cnn", "--input-size", "1", "28", "28"]
        measure("cnn", spec, "fashion_mnist", args.data_dir, out / "cnn", cnn, True, 2)


if __name__ == "__main__":
    main()
