"""The flag groups the commands share: a model (``model_flags``), data (``data_flags``) and
the device (``device_flag``, the same default as ``permask run``'s: ``auto``)."""

from __future__ import annotations

import argparse

import torch

__all__ = ["data_flags", "device_flag", "model_flags", "resolve_device"]


def device_flag(p: argparse.ArgumentParser) -> None:
    """``--device``, ``auto`` resolved as it is parsed (:func:`resolve_device`)."""
    what = "torch device: auto (cuda if available, else cpu), cpu, cuda:1, ..."
    p.add_argument("--device", default="auto", type=resolve_device, help=what)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` where there is one, else ``cpu``; any other name as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def data_flags(
    p: argparse.ArgumentParser, required: bool, batches: str, need: str | None = None
) -> None:
    """``--data``, ``--data-dir``, ``--batches`` and ``--device``; ``need`` says what for."""
    if need is None:
        need = "evaluation and BatchNorm" if required else "activation matching and evaluation"
    p.add_argument("--data", required=required, help=f"dataset for {need} (as permask run's)")
    p.add_argument("--data-dir", help="where the dataset is (default: $PERMASK_DATA)")
    p.add_argument("--batches", type=int, default=50, help=batches)
    device_flag(p)


def model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="resnet20, vgg11, mlp, timm:NAME, tv:NAME or module.path:factory")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--input-size", type=int, nargs="+", default=[3, 32, 32], metavar="N",
                   help="one example's shape, e.g. 3 224 224 (1 28 28 for MNIST)")  # fmt: skip
    p.add_argument("--model-kwargs", default="{}", help="JSON keywords for the model's factory")
    p.add_argument("--ema", action="store_true",
                   help="read the EMA weights (timm's state_dict_ema or model_ema)")  # fmt: skip
