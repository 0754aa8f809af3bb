"""The step-wise commands for your own checkpoints: ``permask trace``, ``permask align`` and
``permask permute-mask`` (docs/cli.md). Each returns what it printed or wrote, raises
:class:`ConfigError` (one line, exit status 2) for any bad input, and writes nothing unless it
succeeds (atomic writes)::

    permask trace tv:resnet18 --input-size 3 64 64
    permask align mlp a.pt b.safetensors --data mnist --out pi.safetensors
    permask permute-mask mlp --perm pi.safetensors mask_a.safetensors --out mask_b.safetensors
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import torch
from torch import nn

import permask
from permask._atomic import atomic_path
from permask.experiment.checkpoints import load_weights, read_mask
from permask.experiment.config import ConfigError
from permask.experiment.models import build_model, check_model_name
from permask.graph import Permutation, PermutationGraph
from permask.sparse import save_mask

__all__ = ["add_commands", "trace_command", "align_command", "permute_mask_command"]


def add_commands(sub: argparse._SubParsersAction) -> None:
    """The commands' parsers, on ``permask``'s subparsers."""
    trace = sub.add_parser("trace", help="print a model's permutation groups")
    _model_flags(trace)
    trace.add_argument("--json", action="store_true", help="groups and frozen axes as JSON")
    trace.set_defaults(handler=trace_command)
    align = sub.add_parser("align", help="the permutation moving checkpoint A into B's basin")
    _model_flags(align)
    align.add_argument("a", help="checkpoint of A (safetensors or torch file)")
    align.add_argument("b", help="checkpoint of B")
    align.add_argument("--out", required=True, help="where to write pi (safetensors)")
    align.add_argument("--method", choices=["activation", "weight"], default="activation")
    align.add_argument("--data", help="dataset for activation matching (as permask run's)")
    align.add_argument("--data-dir", help="where the dataset is (default: $PERMASK_DATA)")
    align.add_argument("--batches", type=int, default=50, help="batches of 128 to match on")
    align.add_argument("--device", default="cpu")
    align.add_argument("--save-permuted", help="also write pi(A) here (safetensors)")
    align.set_defaults(handler=align_command)
    perm = sub.add_parser("permute-mask", help="pi(m_A): move a mask with a permutation")
    _model_flags(perm)
    perm.add_argument("mask", help="mask of A (safetensors, or a torch-prune'd checkpoint)")
    perm.add_argument("--perm", required=True, help="pi from permask align")
    perm.add_argument("--out", required=True, help="where to write the moved mask")
    perm.set_defaults(handler=permute_mask_command)


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="resnet20, vgg11, mlp, timm:NAME, tv:NAME or module.path:factory")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--input-size", type=int, nargs="+", default=[3, 32, 32], metavar="N",
                   help="one example's shape, e.g. 3 224 224 (1 28 28 for MNIST)")  # fmt: skip
    p.add_argument("--model-kwargs", default="{}", help="JSON keywords for the model's factory")


def _build(args: argparse.Namespace) -> tuple[nn.Module, torch.Tensor]:
    """The model of ``args.model`` (fresh weights) and an example input of ``--input-size``."""
    try:
        kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--model-kwargs is not JSON: {err}") from None
    size = list(args.input_size)
    spec = args.model
    try:
        if ":" in spec and spec.split(":", 1)[0] not in ("timm", "tv"):
            model = _factory(spec)(**kwargs)
        else:
            check_model_name(spec)
            image = size[-1] if len(size) > 1 else 32
            model = build_model(spec, args.num_classes, size[0], image, **kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model {spec!r}: {err}") from None
    return model, torch.randn(2, *size)


def _factory(spec: str):
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"model {spec!r}: cannot import {module_name!r} ({err})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"model {spec!r}: {module_name} has no callable {attr!r}")
    return fn


def _trace(model: nn.Module, x: torch.Tensor) -> PermutationGraph:
    try:
        return permask.trace(model, x)
    except permask.TraceError as err:
        raise ConfigError(" ".join(str(err).split())) from None


def _weights(model: nn.Module, path: str) -> nn.Module:
    try:
        return load_weights(model, path)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def trace_command(args: argparse.Namespace) -> str:
    model, x = _build(args)
    graph = _trace(model, x)
    if not args.json:
        return str(graph)
    groups = {g.name: {"size": g.size, "members": [f"{m.tensor}:{m.axis}" for m in g.members]}
              for g in graph}  # fmt: skip
    frozen = [{"name": f.name, "axis": f.axis, "size": f.size, "kind": f.kind,
               "reasons": [str(r) for r in f.reasons]} for f in graph.frozen]  # fmt: skip
    return json.dumps({"groups": groups, "frozen": frozen}, indent=1)


def align_command(args: argparse.Namespace) -> str:
    model_a, x = _build(args)
    model_b = _build(args)[0]
    _weights(model_a, args.a)
    _weights(model_b, args.b)
    _writable(args.out, args.save_permuted)
    loader = None
    if args.method == "activation":
        loader = _loader(args)
    graph = _trace(model_a, x)
    try:
        pi, info = permask.align(
            model_a, model_b, loader, method=args.method, graph=graph,
            max_batches=args.batches, device=args.device, return_info=True,
        )  # fmt: skip
    except (ValueError, TypeError) as err:
        raise ConfigError(" ".join(str(err).split())) from None
    with atomic_path(args.out) as tmp:
        pi.save(tmp)
    lines = [f"pi: {len(pi)} groups -> {args.out} ({info.method} matching, {info.seconds:.1f} s)"]
    if args.save_permuted:
        moved = permask.permute_model(model_a, pi, graph)
        from safetensors.torch import save_file

        with atomic_path(args.save_permuted) as tmp:
            save_file({k: v.contiguous() for k, v in moved.state_dict().items()}, str(tmp))
        lines.append(f"pi(A) -> {args.save_permuted}")
    return "\n".join(lines)


def _loader(args: argparse.Namespace):
    if not args.data:
        raise ConfigError("activation matching needs --data DATASET; or use --method weight")
    from permask.experiment.data import DataNotFoundError
    from permask.experiment.loader import get_loaders

    try:
        train, _, _ = get_loaders(args.data, args.data_dir, batch_size=128, augment=False,
                                  device=args.device, download=False)  # fmt: skip
    except (DataNotFoundError, ValueError) as err:
        raise ConfigError(" ".join(str(err).split())) from None
    return train


def permute_mask_command(args: argparse.Namespace) -> str:
    model, x = _build(args)
    graph = _trace(model, x)
    _writable(args.out)
    try:
        mask = read_mask(args.mask)
        permask.permute_mask(mask, Permutation(), graph)  # names and shapes, before pi
        pi = _permutation(args.perm, graph)
        moved = permask.permute_mask(mask, pi, graph)
    except (ValueError, KeyError) as err:
        raise ConfigError(" ".join(str(err).strip("'\"").split())) from None
    with atomic_path(args.out) as tmp:
        save_mask(moved, tmp)
    return f"pi(mask): {len(moved)} tensors -> {args.out}"


def _permutation(path: str, graph: PermutationGraph) -> Permutation:
    if not Path(path).is_file():
        raise ValueError(f"permutation {path!r} does not exist")
    pi = Permutation.load(path)
    sizes = {g.name: g.size for g in graph}
    wrong = [n for n, p in pi.items() if sizes.get(n) != len(p)]
    if wrong:
        raise ValueError(
            f"permutation {path!r} is not of this model's graph: group {wrong[0]!r} "
            f"{'is not in the graph' if wrong[0] not in sizes else 'has another size'}; "
            "align with the same MODEL and --input-size"
        )
    return pi


def _writable(*paths: str | None) -> None:
    for p in paths:
        if p is not None and not Path(p).resolve().parent.is_dir():
            raise ConfigError(f"cannot write {p!r}: folder {str(Path(p).parent)!r} does not exist")
