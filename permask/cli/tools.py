"""The step-wise commands for your own checkpoints: ``permask trace``, ``permask align``,
``permask permute-mask``, ``permask interpolate`` and ``permask merge`` (docs/cli.md), and
``permask report`` (a finished run's results again, ``--paper``: against the paper). Each
returns what it printed or wrote, raises :class:`ConfigError` (one line, exit status 2) for any
bad input, and writes nothing unless it succeeds (atomic writes)::

    permask trace tv:resnet18 --input-size 3 64 64
    permask align mlp a.pt b.safetensors --data mnist --out pi.safetensors
    permask permute-mask mlp --perm pi.safetensors mask_a.safetensors --out mask_b.safetensors
    permask interpolate mlp a.pt b.safetensors --perm pi.safetensors --data mnist --out interp/
    permask merge mlp a.pt b.safetensors c.pt --data mnist --out merged.safetensors
    permask report runs/r20 --paper
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from torch import nn

import permask
from permask._atomic import atomic_path, atomic_write_bytes
from permask._modules import usable_device
from permask.cli.flags import IMAGE_BATCH, TEXT_BATCH, data_flags, model_flags
from permask.experiment.config import ConfigError, RunConfig, read_run_config
from permask.graph import Permutation, PermutationGraph
from permask.hub import folder_of
from permask.match.alignment import STATS_DTYPES
from permask.match.matchers import get_matcher, matcher_names
from permask.merging import ORTHOGONAL, average, turned_onto
from permask.metrics import evaluate, interpolate, plot_interpolation
from permask.models import build_model
from permask.rotate import tied_parameters
from permask.sparse import save_mask
from permask.weights import load_weights, read_mask

__all__ = [
    "add_commands",
    "trace_command",
    "align_command",
    "permute_mask_command",
    "interpolate_command",
    "merge_command",
    "report_command",
]


def add_commands(sub: argparse._SubParsersAction) -> None:
    """The commands' parsers, on ``permask``'s subparsers."""
    trace = sub.add_parser("trace", help="print a model's permutation groups")
    model_flags(trace)
    trace.add_argument("--json", action="store_true", help="groups and frozen axes as JSON")
    trace.set_defaults(handler=trace_command)
    align = sub.add_parser("align", help="the permutation moving checkpoint A into B's basin")
    model_flags(align, checkpoints=2)
    align.add_argument("--out", required=True, help="where to write pi (safetensors)")
    align.add_argument("--method", choices=matcher_names(), default="activation")
    _memory_flag(align)
    data_flags(align, False, "batches to match on", need="activation matching")
    align.add_argument("--save-permuted", help="also write pi(A) here (safetensors; a "
                       "save_pretrained folder for hf: models)")  # fmt: skip
    align.set_defaults(handler=align_command)
    perm = sub.add_parser("permute-mask", help="pi(m_A): move a mask with a permutation")
    model_flags(perm)
    perm.add_argument("mask", help="mask of A (safetensors, or a torch-prune'd checkpoint)")
    perm.add_argument("--perm", required=True, help="pi from permask align")
    perm.add_argument("--out", required=True, help="where to write the moved mask")
    perm.set_defaults(handler=permute_mask_command)
    _add_interpolate(sub)
    _add_merge(sub)
    _add_report(sub)


def _add_interpolate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("interpolate", help="loss and accuracy along the path from A to B")
    model_flags(p, checkpoints=2)
    p.add_argument("--perm", help="pi from permask align: interpolate pi(A) -> B")
    data_flags(p, required=True, batches="training batches to re-estimate BN (or REPAIR) on")
    p.add_argument("--points", type=int, default=11, help="evenly spaced alphas in [0, 1]")
    p.add_argument("--bn-reset", action=argparse.BooleanOptionalAction, default=True,
                   help="re-estimate BatchNorm statistics at each point (default)")  # fmt: skip
    p.add_argument("--repair", action="store_true",
                   help="REPAIR hidden channels that no BatchNorm renormalises")  # fmt: skip
    _orthogonal_flag(p, "A")
    p.add_argument("--out", required=True, help="folder for interpolation.{csv,json,png}")
    p.set_defaults(handler=interpolate_command)


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="align checkpoints to a reference and average them")
    model_flags(p, checkpoints=0)
    p.add_argument("--out", required=True, help="where to write the merged weights "
                   "(safetensors; a save_pretrained folder for hf: models)")  # fmt: skip
    p.add_argument("--reference", type=int, default=0, help="index of the CKPT aligned to")
    p.add_argument("--method", choices=matcher_names(), default="activation")
    _memory_flag(p)
    _orthogonal_flag(p, "each CKPT")
    p.add_argument("--repair", action="store_true",
                   help="REPAIR the merged model's hidden channels (needs --data)")  # fmt: skip
    data_flags(p, required=False, batches="batches to match and re-estimate BN on")
    p.set_defaults(handler=merge_command)


def _orthogonal_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--orthogonal", choices=ORTHOGONAL[1:],
                   help=f"also turn {what} by the orthogonal maps beyond permutations that the "
                   "graph admits (residual stream of pre-norm models, RoPE planes, value "
                   "and query/key heads; norms folded first), found by the weights, on "
                   "--data's activations, or by the weights and then learned on the "
                   "midpoint's loss over --data")  # fmt: skip


def _memory_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-stats-memory", metavar="SIZE",
                   help="activation matching's statistics at most SIZE (e.g. 4GiB): more "
                   "passes over the data where one does not fit (default: one pass)")  # fmt: skip
    p.add_argument("--stats-dtype", choices=tuple(STATS_DTYPES), default="float64",
                   help="activation matching's statistics: float32 halves their memory "
                   "(default float64)")  # fmt: skip


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="rewrite a finished run's results (--paper: vs the paper)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (--out) of permask run")
    p.add_argument("--paper", action="store_true",
                   help="add the paper's numbers: a section of results.md, paper.png")  # fmt: skip
    p.add_argument("--data-dir", help="where the run's dataset is (default: $PERMASK_DATA)")
    p.set_defaults(handler=report_command)


def _checkpoints(args: argparse.Namespace, count: int | None) -> list[str]:
    """The checkpoints given (``count`` of them, or at least 2); ``args.model`` the MODEL given,
    or the first folder when every positional is an ``hf:`` folder."""
    given = [args.a, args.b] if count == 2 else args.checkpoints
    inputs = [args.model, *(p for p in given if p is not None)]
    folders = all(folder_of(i) for i in inputs)
    args.model, paths = inputs[0], inputs if folders else inputs[1:]
    folder = next((p for p in inputs[1:] if folder_of(p)), None)
    if folder is not None and not folders:
        raise ConfigError(f"{folder} is a folder, which holds its model: give hf: folders alone "
                          f"(permask {args.command} hf:A hf:B ...)")  # fmt: skip
    usage = f"{count} checkpoints" if count else "two or more checkpoints"
    if len(paths) < 2 or (count is not None and len(paths) != count):
        raise ConfigError(f"{args.command} takes MODEL and {usage}, or {usage} as hf: folders "
                          f"alone; got {len(inputs)} inputs: {' '.join(inputs)}")  # fmt: skip
    return paths


def _load(args: argparse.Namespace, checkpoint: str) -> nn.Module:
    """A model of ``args.model`` with the weights of ``checkpoint`` (a file or an hf: folder)."""
    if folder_of(checkpoint):
        return _pretrained(args, checkpoint)
    return _weights(_build(args)[0], checkpoint, args.ema)


def _loaded(args: argparse.Namespace, paths: list[str]) -> list[nn.Module]:
    """The models of ``paths``; one line when hf: folders are not of one architecture."""
    models = [_load(args, p) for p in paths]
    if folder_of(args.model):
        from permask.hub import check_same_architecture

        try:
            check_same_architecture(models, paths)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    return models


def _pretrained(args: argparse.Namespace, spec: str) -> nn.Module:
    from permask.hub import read_pretrained

    try:
        return read_pretrained(folder_of(spec), args.hf_class)
    except ImportError as err:
        raise ConfigError(f"{spec} needs its library: pip install 'permask[hf]' (or "
                          f"'permask[diffusers]'): {err}") from None  # fmt: skip
    except ValueError as err:
        raise ConfigError(" ".join(str(err).split())) from None


def _example(args: argparse.Namespace, model: nn.Module, device: str = "cpu"):
    """An input to trace on, on ``device``: a folder model's (token ids, a UNet's keyword
    inputs: :func:`permask.hub.example_input`), else a batch of ``--input-size``."""
    if not folder_of(args.model):
        return torch.randn(2, *args.input_size, device=device)
    from permask.hub import example_input

    try:
        x = example_input(model)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)


def _build(args: argparse.Namespace) -> tuple[nn.Module, torch.Tensor]:
    """The model of ``args.model`` (fresh weights; an hf: folder's own) and an example input."""
    if folder_of(args.model):
        model = _pretrained(args, args.model)
        return model, _example(args, model)
    try:
        kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--model-kwargs is not JSON: {err}") from None
    size = list(args.input_size)
    spec, image = args.model, size[-1] if len(size) > 1 else 32
    try:
        model = build_model(spec, args.num_classes, size[0], image, **kwargs)
    except (ValueError, TypeError) as err:
        message = str(err) if str(err).startswith("model ") else f"model {spec!r}: {err}"
        raise ConfigError(message) from None
    return model, _example(args, model)


def _trace(model: nn.Module, x: torch.Tensor) -> PermutationGraph:
    try:
        return permask.trace(model, x)
    except permask.TraceError as err:
        raise ConfigError(" ".join(str(err).split())) from None


def _weights(model: nn.Module, path: str, ema: bool = False) -> nn.Module:
    try:
        return load_weights(model, path, ema=ema)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def trace_command(args: argparse.Namespace) -> str:
    model, x = _build(args)
    graph = _trace(model, x)
    admissions = permask.orthogonal_groups(graph)
    sites, values = permask.rope_sites(graph), permask.value_sites(graph)
    keys = permask.query_key_sites(graph)
    if not args.json:
        return f"{graph}\n{_beyond(graph, admissions, sites, values, keys)}"
    groups = {g.name: {"size": g.size, "members": [f"{m.tensor}:{m.axis}" for m in g.members],
                       "orthogonal": admissions[g.name].admitted,
                       "orthogonal_refused": admissions[g.name].reason} for g in graph}  # fmt: skip
    frozen = [{"name": f.name, "axis": f.axis, "size": f.size, "kind": f.kind,
               "reasons": [str(r) for r in f.reasons]} for f in graph.frozen]  # fmt: skip
    rope, value = [s.name for s in sites], [s.name for s in values]
    return json.dumps({"groups": groups, "frozen": frozen, "rope_sites": rope,
                       "value_sites": value, "query_key_sites": [s.name for s in keys]},
                      indent=1)  # fmt: skip


def _beyond(graph: PermutationGraph, admissions: dict, sites: list, values: list,
            keys: list) -> str:  # fmt: skip
    """Which groups admit orthogonal maps (for merging; docs/alignment.md), the RoPE, value and
    query/key sites; for the widest refused group, why not."""
    ok = [a for a in admissions.values() if a.admitted]
    lines = [f"beyond permutations (merge/interpolate --orthogonal): {len(ok)} groups admit "
             f"orthogonal maps, {len(sites)} RoPE sites, {len(values)} value sites, {len(keys)} "
             "query/key sites"]  # fmt: skip
    for a in ok:
        ones = ", keeping the all-ones direction" if a.keeps_ones else ""
        lines.append(f"  {a.group}: {len(a.folds)} norm gains folded{ones}")
    refused = [a for a in admissions.values() if not a.admitted]
    if refused:
        widest = max(refused, key=lambda a: len(graph[a.group].members))
        lines.append(f"  not {widest.group} (the widest group): {widest.reason}")
    return "\n".join(lines)


def align_command(args: argparse.Namespace) -> str:
    paths = _checkpoints(args, 2)
    _writable(args.out, args.save_permuted)
    model_a, model_b = _loaded(args, paths)
    loader = _loaders(args, model_a)[0] if get_matcher(args.method).needs_data else None
    graph = _trace(model_a, _example(args, model_a))
    try:
        pi, info = permask.align(
            model_a, model_b, loader, method=args.method, graph=graph,
            max_batches=args.batches, device=args.device, return_info=True,
            max_stats_memory=args.max_stats_memory, stats_dtype=args.stats_dtype,
        )  # fmt: skip
    except (ValueError, TypeError) as err:
        raise ConfigError(" ".join(str(err).split())) from None
    with atomic_path(args.out) as tmp:
        pi.save(tmp)
    passes = f", {info.passes} passes over the data" if info.passes > 1 else ""
    lines = [f"pi: {len(pi)} groups -> {args.out} ({info.method} matching{passes}, "
             f"{info.seconds:.1f} s)"]  # fmt: skip
    if args.save_permuted:
        _save_weights(args, permask.permute_model(model_a, pi, graph), args.save_permuted)
        lines.append(f"pi(A) -> {args.save_permuted}")
    return "\n".join(lines)


def _save_weights(args: argparse.Namespace, model: nn.Module, path: str) -> None:
    """The model's weights at ``path``, atomically: a save_pretrained folder like MODEL's for
    hf: models, else a safetensors file of its state dict."""
    if folder_of(args.model):
        from permask.hub import save_pretrained

        return save_pretrained(model, path, like=folder_of(args.model))
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(tmp))  # fmt: skip


def _untied(models: list[nn.Module]) -> list[nn.Module]:
    """For --orthogonal: models with a tied output layer untied (a tie refuses the maps;
    :func:`permask.untie_weights`, the same function); a merged model keeps its own head."""
    return [permask.untie_weights(m) if tied_parameters(m) else m for m in models]


def _loaders(args: argparse.Namespace, model: nn.Module):
    """The unaugmented training batches and the test batches of ``--data`` for ``model``."""
    if not args.data:
        raise ConfigError("activation matching needs --data DATASET; or use --method weight")
    from permask.data.datasets import DataNotFoundError
    from permask.data.loader import get_loaders

    try:
        if args.data.startswith("text:"):
            return _text(args, model)
        train, test, _ = get_loaders(args.data, args.data_dir, augment=False, device=args.device,
                                     batch_size=args.batch_size or IMAGE_BATCH,
                                     download=False)  # fmt: skip
    except (DataNotFoundError, ValueError) as err:
        raise ConfigError(" ".join(str(err).split())) from None
    return train, test


def _text(args: argparse.Namespace, model: nn.Module):
    """``--data text:FILE`` in windows of ``--seq-len``, tokenised as MODEL's folder says."""
    from permask.data.text import text_batches

    tokenizer = None
    if folder_of(args.model):
        from permask.hub import tokenizer_of

        tokenizer = tokenizer_of(folder_of(args.model))
    embed = getattr(model, "get_input_embeddings", lambda: None)()
    return text_batches(args.data.removeprefix("text:"), args.seq_len,
                        args.batch_size or TEXT_BATCH, tokenizer=tokenizer,
                        vocab_size=getattr(embed, "num_embeddings", None),
                        device=args.device)  # fmt: skip


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


def interpolate_command(args: argparse.Namespace) -> str:
    if args.points < 2:
        raise ConfigError(f"--points must be at least 2, got {args.points}")
    out = Path(args.out)
    paths = _checkpoints(args, 2)
    _writable(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {args.out!r} is a file; give a folder")
    model_a, model_b = _loaded(args, paths)
    if args.orthogonal:
        model_a, model_b = _untied([model_a, model_b])
    needs_graph = args.perm or args.repair or args.orthogonal
    graph = _trace(model_a, _example(args, model_a)) if needs_graph else None
    if args.perm:
        model_a = permask.permute_model(model_a, _read_permutation(args.perm, graph), graph)
    device = _device(args.device, "interpolate")
    train, test = _loaders(args, model_a)
    try:
        if args.orthogonal:
            model_b, model_a = turned_onto(
                [model_b, model_a], 0, graph, train, orthogonal=args.orthogonal,
                max_batches=args.batches,
            )  # fmt: skip
        result = interpolate(model_a, model_b, test, alphas=args.points, reset_bn=args.bn_reset,
                             bn_loader=train, bn_batches=args.batches, device=device,
                             repair=args.repair, graph=graph)  # fmt: skip
    except (ValueError, TypeError) as err:
        raise ConfigError(" ".join(str(err).split())) from None
    _write_interpolation(args, paths, result)
    return _interpolation_report(args, result, _has_batchnorm(model_b))


def _write_interpolation(args: argparse.Namespace, paths: list[str], result: dict) -> None:
    """interpolation.png, .csv and .json in ``--out`` (each atomically; the folder is made)."""
    out = Path(args.out)
    a, b = paths
    title = f"{Path(a).name}{' (permuted)' if args.perm else ''} -> {Path(b).name}"
    plot_interpolation(result, out / "interpolation.png", title=title)
    rows = zip(result["alphas"], result["losses"], result["accs"])
    csv = "alpha,loss,acc\n" + "".join(f"{a!r},{loss!r},{acc!r}\n" for a, loss, acc in rows)
    atomic_write_bytes(csv.encode(), out / "interpolation.csv")
    meta = {"model": args.model, "a": a, "b": b, "perm": args.perm, "data": args.data,
            "bn_reset": args.bn_reset, "bn_batches": args.batches,
            "repair": args.repair, "orthogonal": args.orthogonal}  # fmt: skip
    blob = json.dumps({**meta, **result}, indent=1).encode()
    atomic_write_bytes(blob, out / "interpolation.json")


def _interpolation_report(args: argparse.Namespace, result: dict, batchnorm: bool) -> str:
    lines = ["alpha" + _score_columns(args)]
    for a, loss, acc in zip(result["alphas"], result["losses"], result["accs"]):
        lines.append(f"{a:5.2f}" + _score_columns(args, loss, acc))
    path = f"pi(A) -> B (pi: {args.perm})" if args.perm else "A -> B (not aligned)"
    lines.append(f"barrier {path}: loss {result['barrier']:.4f}, "
                 f"accuracy {100 * result['acc_barrier']:.2f} points")  # fmt: skip
    if batchnorm and args.bn_reset:
        lines.append(f"BatchNorm statistics re-estimated at every point on {args.batches} batches")
    elif batchnorm:
        lines.append("BatchNorm statistics interpolated as they are (--no-bn-reset)")
    if args.repair:
        lines.append(f"REPAIR applied at every point, measured on {args.batches} batches")
    if args.orthogonal:
        lines.append(f"norms folded, A turned onto B by orthogonal maps ({args.orthogonal})")
    lines.append(f"-> {Path(args.out) / 'interpolation'}.{{csv,json,png}}")
    return "\n".join(lines)


def _score_columns(args: argparse.Namespace, loss: float | None = None, acc: float = 0.0) -> str:
    """A table row's loss and accuracy cells, and perplexity for ``text:`` data; their header
    when ``loss`` is ``None``."""
    text = args.data.startswith("text:")
    if loss is None:
        return "    loss  accuracy" + ("  perplexity" if text else "")
    return f" {loss:7.4f}  {100 * acc:7.2f}%" + (f"  {math.exp(loss):10.3f}" if text else "")


def merge_command(args: argparse.Namespace) -> str:
    paths = _checkpoints(args, None)
    if args.repair and not args.data:
        raise ConfigError("--repair needs --data DATASET to measure the channels on")
    if not 0 <= args.reference < len(paths):
        raise ConfigError(f"--reference must be 0..{len(paths) - 1} (a CKPT's index), "
                          f"got {args.reference}")  # fmt: skip
    _writable(args.out)
    device = _device(args.device, "merge")
    models = [model.to(device) for model in _loaded(args, paths)]
    if args.orthogonal:
        models = _untied(models)
    needs_data = args.data or get_matcher(args.method).needs_data
    train, test = _loaders(args, models[0]) if needs_data else (None, None)
    graph = _trace(models[args.reference], _example(args, models[0], device))
    common = dict(reference=args.reference, max_batches=args.batches, device=device)
    try:
        merged = permask.merge(models, train, method=args.method, graph=graph,
                               repair=args.repair, max_stats_memory=args.max_stats_memory,
                               stats_dtype=args.stats_dtype, orthogonal=args.orthogonal,
                               **common)  # fmt: skip
        naive = average(models, bn_loader=train, **common)
        scores = None if test is None else [evaluate(m, test) for m in (*models, naive, merged)]
    except (ValueError, TypeError) as err:
        raise ConfigError(" ".join(str(err).split())) from None
    _save_weights(args, merged, args.out)
    return _merge_report(args, paths, scores, _has_batchnorm(merged))


def _merge_report(
    args: argparse.Namespace, paths: list[str], scores: list | None, batchnorm: bool
) -> str:
    done = (f"merged ({args.method} matching, reference {paths[args.reference]}) "
            f"-> {args.out}")  # fmt: skip
    if scores is None:
        bn = "; BatchNorm statistics are the models' average" if batchnorm else ""
        return f"{done}\nnot evaluated: no --data{bn}"
    names = [Path(p).name + (" (reference)" if i == args.reference else "")
             for i, p in enumerate(paths)]  # fmt: skip
    names += ["naive average", "merged" + (" + REPAIR" if args.repair else "")]
    width = max(len(n) for n in names)
    lines = [f"{'model':{width}}" + _score_columns(args)]
    for name, (loss, acc) in zip(names, scores):
        lines.append(f"{name:{width}}" + _score_columns(args, loss, acc))
    return "\n".join([*lines, done])


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _device(device: str, caller: str) -> torch.device:
    try:
        return usable_device(device, caller)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _read_permutation(path: str, graph: PermutationGraph) -> Permutation:
    try:
        return _permutation(path, graph)
    except ValueError as err:
        raise ConfigError(" ".join(str(err).strip("'\"").split())) from None


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


def report_command(args: argparse.Namespace) -> str:
    from permask.experiment.report import collect, paper_markdown, write_paper, write_report

    run_dir = Path(args.run_dir)
    cfg = _saved_config(run_dir, args.data_dir)
    labels, num_classes = _test_labels(cfg)
    try:
        results = collect(run_dir, cfg, labels, num_classes)
    except FileNotFoundError as err:
        missing = Path(err.filename).relative_to(run_dir)
        raise ConfigError(
            f"run {run_dir} is not finished: {missing} is missing; `permask run --config "
            f"{run_dir / 'config.yaml'} --out {run_dir}` (the same config) resumes it"
        ) from None
    except ValueError as err:  # eval.pt of another test set than the one found
        why = " ".join(str(err).split())
        raise ConfigError(f"{why}: the test set found is not the run's; give --data-dir") from None
    old = run_dir / "results.json"  # keep what the last permask run measured of itself
    before = json.loads(old.read_text()) if old.is_file() else {}
    results.stages = before.get("stages", [])
    write_report(run_dir, cfg, results, before.get("wall_seconds", 0.0))
    if not args.paper:
        return results.markdown()
    write_paper(run_dir, cfg, results)
    return f"{results.markdown()}\n\n{paper_markdown(results, cfg)}"


def _saved_config(run_dir: Path, data_dir: str | None) -> RunConfig:
    """The run's config from its ``config.yaml`` (:func:`read_run_config`)."""
    cfg = read_run_config(run_dir, data_dir=data_dir, out=str(run_dir), progress=False)
    if cfg is None:
        raise ConfigError(f"{run_dir} has no config.yaml: give the run directory (--out) of a "
                          "permask run")  # fmt: skip
    return cfg


def _test_labels(cfg: RunConfig) -> tuple[torch.Tensor, int]:
    """The run's test labels and class count, read as ``permask run`` reads its data (no model
    built or traced; nothing downloaded)."""
    from permask.data.datasets import DataNotFoundError
    from permask.data.loader import get_loaders

    try:
        _, test, info = get_loaders(
            cfg.dataset, cfg.data_dir, batch_size=cfg.batch_size, train_subset=cfg.train_subset,
            test_subset=cfg.test_subset, crop=cfg.crop, workers=cfg.workers, download=False,
        )  # fmt: skip
    except (DataNotFoundError, ValueError) as err:
        raise ConfigError(f"{' '.join(str(err).split())}; give --data-dir") from None
    return test.labels.cpu(), info.num_classes
