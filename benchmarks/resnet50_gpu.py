"""ResNet50 at ImageNet scale on one GPU: the figures issue 13 asks for, as ratios in one run.

    python benchmarks/resnet50_gpu.py                 # on a CUDA machine, all parts
    python benchmarks/resnet50_gpu.py --device cpu --size 32 --batch 4 --batches 2 --steps 2
                                                      # a smoke test of the script itself

1. ``train``: training throughput (images/s) of torchvision's resnet50 with ``permask``'s own
   training loop (``permask.experiment.train.train``, as ``permask run`` calls it): dense against
   ``MaskedOptimizer`` at 90% sparsity (magnitude, per layer), bf16 autocast, channels_last, SGD
   momentum 0.9 and wd 1e-4 as in the ImageNet recipe, on batches already on the device (the
   loader is part 3). Each call trains 2 epochs of ``--steps`` steps; the second epoch's time
   counts; variants alternate, median over ``--repeats``. Peak GPU memory per variant.
2. ``match``: activation matching (``permask.align``) over ``--batches`` batches of ``--batch``
   random 224x224 images already on the device, against plain inference of A and B over the
   same batches, in float32 (cuDNN's TF32 convolutions, torch's default) and under bf16
   autocast; statistics with float32 products (``precision="highest"``) and TF32
   (``"high"``); how many permutation entries each gives like float32, and the largest
   correlation change TF32 makes on 10 of the batches.
3. ``loader``: images/s of the ImageNet input pipeline (``get_loaders("imagefolder:...")``:
   JPEG decoding, RandomResizedCrop 224 + flip in ``--workers`` processes) on a generated
   folder of 256x320 JPEGs, to say whether data or GPU limits an epoch.
4. ``profile``: the data pass's top CUDA kernels (torch.profiler) over 3 batches.
"""

from __future__ import annotations

import argparse
import functools
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

import permask
from permask.experiment.train import train
from permask.match import activation
from permask.sparse import magnitude_mask

sys.path.insert(0, str(Path(__file__).resolve().parent))
from align import _seconds, _sync  # noqa: E402  (benchmarks/align.py: GPU-synchronised clock)


def train_part(args, device: torch.device) -> None:
    for name in args.models:
        _train_model(args, device, name)


def _train_model(args, device: torch.device, arch: str) -> None:
    factory = getattr(torchvision.models, arch)
    torch.manual_seed(0)
    shape = (args.batch, 3, args.size, args.size)
    data = [
        (
            torch.randn(shape, device=device).contiguous(memory_format=torch.channels_last),
            torch.randint(0, 1000, (args.batch,), device=device),
        )
        for _ in range(args.steps)
    ]
    base = factory()
    mask = magnitude_mask(base, 0.9, scope="layer")
    times: dict[str, list[float]] = {"dense": [], "masked": []}
    peak: dict[str, float] = {}
    for r in range(args.repeats):
        for name in ("dense", "masked") if r % 2 == 0 else ("masked", "dense"):
            model = factory()
            model.load_state_dict(base.state_dict())
            model = model.to(device, memory_format=torch.channels_last)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            res = train(model, data, epochs=2, lr=0.1, weight_decay=1e-4, device=device,
                        mask=mask if name == "masked" else None, amp=args.amp,
                        progress=False)  # fmt: skip
            times[name].append(res.history[1]["seconds"])
            if device.type == "cuda":
                peak[name] = torch.cuda.max_memory_allocated(device) / 2**30
            if name == "masked":  # checked, not assumed
                w = dict(model.named_parameters())
                assert all(not w[k][~m.to(device)].any() for k, m in mask.items())
    images = args.steps * args.batch
    print(f"\n### train: {arch}, batch {args.batch}, {args.size}x{args.size}, amp {args.amp}, "
          f"channels_last, {args.steps} steps per epoch, median of {args.repeats}\n")  # fmt: skip
    print("| variant | s/epoch | images/s | ratio to dense | peak GPU GiB |\n|---|---|---|---|---|")
    dense = statistics.median(times["dense"])
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"| {name} | {t:.3f} | {images / t:.0f} | {t / dense:.3f} | "
              f"{peak.get(name, float('nan')):.1f} |", flush=True)  # fmt: skip


def match_part(args, device: torch.device) -> None:
    torch.manual_seed(0)
    a = torchvision.models.resnet50().eval().to(device)
    torch.manual_seed(1)
    b = torchvision.models.resnet50().eval().to(device)
    shape = (args.batch, 3, args.size, args.size)
    data = [torch.randn(shape, device=device) for _ in range(args.batches)]
    graph = permask.trace(a, data[0][:2])

    @torch.no_grad()
    def plain():
        for x in data:
            a(x)
            b(x)

    rows, perms = [], {}
    for amp in (False, True):
        ctx = functools.partial(torch.autocast, device.type, torch.bfloat16, enabled=amp)
        with ctx():
            plain()  # warm-up (cuDNN algorithms)
            t_plain = _seconds(plain, device)
        variants = [("high", True)]
        if not amp:  # float32 products, and the three-pass moments (the CPU's path)
            variants = [("highest", True), *variants, ("highest", False)]
        for precision, fused in variants:
            activation.FUSED_MOMENTS[device.type] = fused
            try:
                with ctx():
                    permask.align(a, b, data[:2], graph=graph, precision=precision)  # warm-up
                    t = time.perf_counter()
                    pi, info = permask.align(
                        a, b, data, graph=graph, precision=precision, return_info=True
                    )
                    total = time.perf_counter() - t
            except Exception as err:  # report and go on: the other figures still count
                print(f"{'bf16' if amp else 'float32'} {precision}: {type(err).__name__}: {err}")
                continue
            finally:
                activation.FUSED_MOMENTS[device.type] = device.type == "cuda"
            perms[(amp, precision, fused)] = pi
            rows.append((amp, precision, fused, t_plain, info.pass_seconds, total))
    print(f"\n### match: resnet50 A and B, {args.batches} batches of {args.batch}x3x{args.size}"
          f"x{args.size} on the device, random init\n")  # fmt: skip
    print("| forwards | stats products | moments | plain A+B (s) | data pass (s) | pass / plain "
          "| total (s) | total / plain | same pi as float32 |")  # fmt: skip
    print("|---" * 9 + "|")
    ref = perms.get((False, "highest", True))
    for amp, precision, fused, t_plain, t_pass, total in rows:
        pi = perms[(amp, precision, fused)]
        same = float("nan") if ref is None else _same(pi, ref)
        print(f"| {'bf16 autocast' if amp else 'float32'} | {precision} | "
              f"{'var_mean' if fused else 'sum, square, sum'} | {t_plain:.2f} | {t_pass:.2f} | "
              f"{t_pass / t_plain:.2f} | {total:.2f} | {total / t_plain:.2f} | {same:.3f} |",
              flush=True)  # fmt: skip
    change = _corr_change(a, b, graph, data[:10], device, "high")
    print(f"high vs highest products, 10 batches: max |corr change| = {change:.2e}")


def _same(pi, ref) -> float:
    """Fraction of all groups' indices where two permutations agree."""
    agree = sum(int((pi[k] == ref[k]).sum()) for k in ref)
    return agree / sum(ref[k].numel() for k in ref)


def _corr_change(a, b, graph, data, device, other: str) -> float:
    from permask.match.points import plan_points

    plan = plan_points(graph)
    scores = []
    for precision in ("highest", other):
        stats = activation.CorrelationStats(plan, device, precision)
        paired = activation.paired_module(a, b, graph.fx_graph, stats)
        with torch.no_grad():
            for x in data:
                paired(x)
        scores.append(stats.scores())
    return max(float((scores[0][k] - scores[1][k]).abs().max()) for k in scores[0])


def loader_part(args, device: torch.device) -> None:
    from PIL import Image

    from permask.data.loader import get_loaders

    root = Path(tempfile.mkdtemp())
    g = torch.Generator().manual_seed(0)
    per_class = max(1, args.loader_images // 10)
    for split, n in (("train", per_class), ("val", 1)):
        for c in range(10):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                img = torch.randint(0, 256, (256, 320, 3), generator=g, dtype=torch.uint8)
                Image.fromarray(img.numpy()).save(folder / f"{i}.jpg", quality=90)
    train_loader, _, _ = get_loaders(
        f"imagefolder:{root}", batch_size=args.batch, crop=224, workers=args.workers,
        device=device,
    )  # fmt: skip
    for epoch in range(2):  # the first starts the worker processes
        train_loader.set_epoch(epoch)
        t = time.perf_counter()
        n = 0
        for x, _ in train_loader:
            n += len(x)
        _sync(device)
        t = time.perf_counter() - t
    print(f"\n### loader: {n} JPEGs 256x320 -> RandomResizedCrop 224, batch {args.batch}, "
          f"{args.workers} workers: {n / t:.0f} images/s (second epoch)", flush=True)  # fmt: skip


def profile_part(args, device: torch.device) -> None:
    from torch.profiler import ProfilerActivity, profile

    from permask.match.points import plan_points

    torch.manual_seed(0)
    a = torchvision.models.resnet50().eval().to(device)
    b = torchvision.models.resnet50().eval().to(device)
    data = [torch.randn(args.batch, 3, args.size, args.size, device=device) for _ in range(3)]
    graph = permask.trace(a, data[0][:2])
    stats = activation.CorrelationStats(plan_points(graph), device)
    paired = activation.paired_module(a, b, graph.fx_graph, stats)
    with torch.no_grad():
        paired(data[0])
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for x in data:
                paired(x)
            _sync(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print("\n### profile: data pass, 3 batches\n")
    print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batches", type=int, default=100, help="match: batches")
    parser.add_argument("--steps", type=int, default=20, help="train: steps per epoch")
    parser.add_argument("--repeats", type=int, default=2, help="train: repeats per variant")
    parser.add_argument("--models", nargs="+", default=["resnet50", "wide_resnet50_2"],
                        help="train: torchvision models")  # fmt: skip
    parser.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "off"])
    parser.add_argument("--workers", type=int, default=14, help="loader: worker processes")
    parser.add_argument("--loader-images", type=int, default=2560)
    parser.add_argument("--parts", nargs="+", default=["train", "match", "loader", "profile"],
                        choices=["train", "match", "loader", "profile"])  # fmt: skip
    args = parser.parse_args()
    logging.getLogger("permask").setLevel(logging.ERROR)  # random-init nets: dead-unit warnings
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {where}, TF32 matmul "
          f"{torch.get_float32_matmul_precision()}, cuDNN TF32 "
          f"{torch.backends.cudnn.allow_tf32}", flush=True)  # fmt: skip
    for part in args.parts:
        t = time.perf_counter()
        globals()[f"{part}_part"](args, device)
        print(f"({part}: {time.perf_counter() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
