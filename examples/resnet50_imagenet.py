"""The paper's ImageNet experiment (ResNet50 x1 or x2) as one command, on 1 GPU or many.

Sets the recipe of the paper's ImageNet runs and calls ``permask.experiment.run``, the pipeline
of ``permask run``: dense A and B, IMP on A with fine-tuning, alignment of A to B, then sparse
training from rewind point k of LTH, naive and permuted, the table and the interpolation.
Every ``permask run`` flag works here too and overrides the recipe (``--help`` lists them).

    # one GPU
    python examples/resnet50_imagenet.py /data/imagenet --out runs/r50
    # 8 GPUs on one node (global batch 256 = 32 per GPU; the command is the same)
    torchrun --nproc-per-node 8 examples/resnet50_imagenet.py /data/imagenet --out runs/r50
    # 2 nodes x 8 GPUs, run on each node (the run directory on a shared file system)
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        examples/resnet50_imagenet.py /data/imagenet --out /shared/runs/r50

The folder holds ``train/<class>/*`` and ``val/<class>/*`` (torchvision's ImageFolder layout).
docs/imagenet.md has what each stage costs.
"""

from __future__ import annotations

import argparse
import sys

from permask.experiment import run
from permask.experiment.config import ConfigError, add_config_flags, config_from_flags
from permask.experiment.distributed import leave_world
from permask.experiment.recipes import recipe_values

MODELS = {1: "tv:resnet50", 2: "tv:wide_resnet50_2"}


def recipe(args: argparse.Namespace) -> dict:
    """The ``paper-imagenet`` recipe (permask/experiment/recipes.py: 90 epochs, global batch 256,
    SGD momentum 0.9, wd 1e-4, 5 warm-up epochs, step decay, IMP 20 epochs per level) for this
    folder and width, with both learning rates scaled by batch / 256 (Goyal et al.'s rule; the
    fine-tuning lr 0.01 is the paper's CIFAR ratio 0.01 / 0.08, not stated for ImageNet)."""
    values = recipe_values("paper-imagenet")
    batch = getattr(args, "batch_size", values["batch_size"])
    width = getattr(args, "width", 1)
    scale = batch / values["batch_size"]
    values.update(
        model=MODELS[width] if width in MODELS else MODELS[1],
        dataset=f"imagefolder:{args.data}", batch_size=batch, lr=values["lr"] * scale,
        finetune_lr=values["finetune_lr"] * scale,
    )  # fmt: skip
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Recipe defaults (override with the flags above): "
        + ", ".join(f"{k}={v}" for k, v in recipe(argparse.Namespace(data="PATH")).items()),
    )
    parser.add_argument("data", help="ImageNet folder with train/ and val/ (ImageFolder layout)")
    add_config_flags(parser)  # --width 1: torchvision resnet50; --width 2: wide_resnet50_2
    args = parser.parse_args(argv)
    if getattr(args, "width", 1) not in MODELS:
        parser.error(f"--width must be 1 (resnet50) or 2 (wide_resnet50_2), got {args.width}")
    values = recipe(args)  # --width picks the model: the run's own width setting stays 1
    vars(args).pop("width", None)
    try:
        cfg = config_from_flags(args, **values)
        results = run(cfg)
    except ConfigError as err:
        print(f"resnet50_imagenet: error: {err}", file=sys.stderr)
        return 2
    if leave_world():  # under torchrun: rank 0 prints the table
        print(results.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
