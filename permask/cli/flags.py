"""The flag groups the commands share: a model (``model_flags``), data (``data_flags``) and
the device (``device_flag``, the same default as ``permask run``'s: ``auto``)."""

from __future__ import annotations

import argparse

import torch

__all__ = ["data_flags", "device_flag", "model_flags", "resolve_device"]

IMAGE_BATCH, TEXT_BATCH = 128, 8


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
    p.add_argument("--data", required=required,
                   help=f"dataset for {need}: as permask run's, or text:FILE (plain text or "
                   ".jsonl with a 'text' field) for language models")  # fmt: skip
    p.add_argument("--data-dir", help="where the dataset is (default: $PERMASK_DATA)")
    p.add_argument("--batches", type=int, default=50, help=batches)
    p.add_argument("--batch-size", type=int,
                   help=f"images or text windows per batch (default {IMAGE_BATCH} images, "
                   f"{TEXT_BATCH} windows)")  # fmt: skip
    p.add_argument("--seq-len", type=int, default=128, help="tokens per text window (text:FILE)")
    device_flag(p)


MODELS = (
    "resnet20, vgg11, mlp, timm:NAME, tv:NAME, module.path:factory, hf:FOLDER or diffusers:FOLDER"
)


def model_flags(p: argparse.ArgumentParser, checkpoints: int | None = None) -> None:
    """The model's flags: MODEL, then ``checkpoints`` checkpoints (``None``: none; ``0``: two or
    more) which may stand alone, MODEL left out, when they are ``hf:``/``diffusers:`` folders."""
    p.add_argument("model", metavar="MODEL", help=MODELS)
    ckpt = "a checkpoint (safetensors or torch file; hf:FOLDER with MODEL left out)"
    if checkpoints == 2:
        p.add_argument("a", metavar="A", help=f"{ckpt} of A")
        p.add_argument("b", metavar="B", nargs="?", help="the same of B")
    elif checkpoints == 0:
        p.add_argument("checkpoints", nargs="+", metavar="CKPT", help=f"two or more: {ckpt}")
    p.add_argument("--hf-class", help="transformers class of hf: folders (default: the "
                   "config's architectures, e.g. LlamaForCausalLM)")  # fmt: skip
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--input-size", type=int, nargs="+", default=[3, 32, 32], metavar="N",
                   help="one example's shape, e.g. 3 224 224 (1 28 28 for MNIST)")  # fmt: skip
    p.add_argument("--model-kwargs", default="{}", help="JSON keywords for the model's factory")
    p.add_argument("--ema", action="store_true",
                   help="read the EMA weights (timm's state_dict_ema or model_ema)")  # fmt: skip
