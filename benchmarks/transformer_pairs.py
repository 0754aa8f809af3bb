"""Trained transformer pairs: how much of the loss barrier each matching method removes.

Two byte-level language models per architecture (Hugging Face GPT-2: fused ``Conv1D``
projections; Llama: grouped-query attention, RoPE, gated MLP) trained here from two seeds on the
source code of a few standard-library modules, and two timm ViTs (dim 64, depth 4, 4x4 patches)
trained 3 epochs on Fashion-MNIST ($PERMASK_DATA), all by AdamW with the usual schedule (linear
warmup over 5% of the steps, cosine decay to zero; weight decay 0.1 for the language models,
0.05 for the ViT; ``--schedule constant --weight-decay 0`` for the constant rate the first rows
used); then, for each method (weight, activation, STE), the loss barrier of the straight path
pi(A) -> B on held-out text, without and with REPAIR, as a ratio to the naive path's barrier
A -> B. Where the graph admits orthogonal maps of the residual
stream (RMSNorm/pre-LayerNorm models, permask.orthogonal_groups; a tied output layer is untied
first, permask.untie_weights), each method is followed by folding the norms (``+fold``: the
path between the folded models, no map)
and by Procrustes on the weights (``+orthogonal``) or on the activations of the matching
batches (``+orthogonal-act``), or on the weights and then learned on the midpoint's loss over
STE's batches (``+orthogonal-learned``); all turn RoPE's frequency planes too where the graph has
RoPE sites (permask.rope_sites). One JSON line per pair is appended to
``benchmarks/results/transformer_pairs.jsonl``; docs/results.md shows the latest rows beside the
published ratios (Theus et al., NeurIPS 2025).

    python benchmarks/transformer_pairs.py                 # the three pairs, ~20 min on 2 cores
    python benchmarks/transformer_pairs.py --kinds llama --steps 100 --no-save   # a quick look

``--cache DIR`` keeps the trained models there and reuses them on the next run; ``--seeds 3 4``
trains another pair, for the spread between pairs (rows record their seeds). Larger language
models: ``--hidden``, ``--layers``, ``--heads``, ``--kv-heads``, and ``--corpus stdlib`` for the
whole standard library's source (tests left out, about 12 MB) in place of four modules';
``--device cuda`` trains on a GPU (matching and the barriers stay on the CPU, ``--threads``
of it), e.g. on a GPU machine::

    python benchmarks/transformer_pairs.py --kinds llama gpt2 --device cuda --threads 16 \
        --hidden 512 --layers 8 --heads 8 --kv-heads 2 --corpus stdlib --steps 5000 \
        --cache runs/pairs

Rows of a shape other than the defaults record it (``heads``, ``corpus``, ``device``), and
docs/results.md's tables show only the default shape's rows.

Needs the ``hf`` extra.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from hf_align import (  # noqa: E402
    NextToken,
    as_classification,
    batches,
    corpus,
    train,
    warmup_cosine,
)

import permask  # noqa: E402
from permask.merging import turned_onto  # noqa: E402
from permask.metrics import interpolate  # noqa: E402
from permask.rotate import tied_parameters  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "transformer_pairs.jsonl"


def model(kind: str, hidden: int, layers: int, seed: int, heads: int = 4,
          kv_heads: int = 2) -> nn.Module:  # fmt: skip
    from transformers import AutoConfig, AutoModelForCausalLM

    special = dict(vocab_size=256, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if kind == "gpt2":
        config = AutoConfig.for_model("gpt2", n_embd=hidden, n_layer=layers, n_head=heads,
                                      n_positions=128, **special)  # fmt: skip
    else:
        config = AutoConfig.for_model(
            "llama", hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
            **special,
        )  # fmt: skip
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def trained_pair(kind: str, args: argparse.Namespace, build=None) -> tuple:
    """(A, B, the matching batches, A's graph, the test data, seconds to train or load) of the
    ``kind`` pair (module doc), or of the language models ``build(seed)`` makes, kept as
    ``kind``; trained models are kept under ``args.cache``."""
    if kind == "vit":
        return _vit_trained(args)
    data = corpus() if args.corpus == "modules" else stdlib_corpus(args.corpus_mb)
    split = int(0.9 * len(data))
    train_data = batches(data[:split], args.steps, 16, args.seq, seed=0)
    test = as_classification(batches(data[split:], 8, 16, args.seq, seed=1))
    t0 = time.perf_counter()
    recipe = dict(weight_decay=args.weight_decay, cosine=args.schedule == "cosine",
                  device=args.device)  # fmt: skip
    name = f"{kind}{args.hidden}x{args.layers}_{args.steps}{_recipe(args)}{_shape(kind, args)}"
    a, b = (
        _trained(args, name, seed,
                 build or (lambda s: model(kind, args.hidden, args.layers, s, args.heads,
                                           args.kv_heads)),
                 lambda m, s: train(m, train_data, args.steps, **recipe))
        for seed in args.seeds
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    graph = permask.trace(a, {"input_ids": train_data[0]["input_ids"]})
    return a, b, train_data[: args.match_batches], graph, test, seconds


def pair(kind: str, args: argparse.Namespace) -> dict:
    a, b, match, graph, test, seconds = trained_pair(kind, args)
    row: dict = {"kind": kind, "hidden": args.hidden, "layers": args.layers, "steps": args.steps,
                 "schedule": args.schedule, "weight_decay": args.weight_decay,
                 "seeds": args.seeds, "train_seconds": seconds, **_extras(kind, args)}  # fmt: skip
    wrapped_graph = None
    row["naive"] = _barriers(a, b, test, match, None)
    for method in ("weight", "activation", "ste"):
        data_for = {
            "weight": None,
            "activation": match,
            "ste": _lm_batches(match) * args.ste_passes,
        }
        t0 = time.perf_counter()
        pi = permask.align(a, b, data_for[method], method=method, graph=graph)
        seconds = time.perf_counter() - t0
        moved = permask.permute_model(a, pi, graph)
        if wrapped_graph is None:
            wrapped_graph = permask.trace(NextToken(moved), as_classification(match)[0][0])
        row[method] = {**_barriers(moved, b, test, match, wrapped_graph), "seconds": seconds}
        print(kind, method, row[method], flush=True)
        x, y, g, wrapped = moved, b, graph, wrapped_graph
        if tied_parameters(a):  # a tied head refuses the maps: untied copies (same functions)
            x, y = permask.untie_weights(moved), permask.untie_weights(b)
            g = permask.trace(y, {"input_ids": match[0]["input_ids"]})
            wrapped = permask.trace(NextToken(x), as_classification(match)[0][0])
            row["untied"] = True
        turns = _rotated(method, x, y, g, row, data_for[method] or match, data_for["ste"])
        for name, (x2, y2, extra) in turns.items():
            row[name] = {**_barriers(x2, y2, test, match, wrapped), **extra}
            print(kind, name, row[name], flush=True)
    return row


def _rotated(method: str, moved: nn.Module, b: nn.Module, graph, row: dict, data,
             learn) -> dict:  # fmt: skip
    """``{method}+fold``: both models with their norms folded; ``{method}+orthogonal``: then A
    turned onto B by :func:`permask.merging.turned_onto` (Procrustes on the weights, and the
    permutation found again, in turn; STE runs once on ``data`` after the maps),
    ``{method}+orthogonal-act`` on the activations of ``data``, ``{method}+orthogonal-learned``
    by the weights and then learned on the midpoint's loss over ``learn`` (STE's batches).
    Empty (and the reason in ``row``) when no group admits an orthogonal map and the graph has
    no RoPE site."""
    found = permask.orthogonal_groups(graph)
    if not any(a.admitted for a in found.values()) and not permask.rope_sites(graph):
        widest = max(graph, key=lambda g: len(g.members)).name
        row["orthogonal_refused"] = found[widest].reason
        return {}
    a_folded, b_folded = permask.fold_norms(moved, graph), permask.fold_norms(b, graph)
    out = {f"{method}+fold": (a_folded, b_folded, {})}
    for name, by, loader in (("orthogonal", "weight", data),
                             ("orthogonal-act", "activation", data),
                             ("orthogonal-learned", "learned", learn)):  # fmt: skip
        t0 = time.perf_counter()
        b_turned, turned = turned_onto([b, moved], 0, graph, loader, orthogonal=by,
                                       method=method)  # fmt: skip
        out[f"{method}+{name}"] = (turned, b_turned, {"seconds": time.perf_counter() - t0})
    return out


def _trained(args: argparse.Namespace, name: str, seed: int, build, fit) -> nn.Module:
    """``fit(build(seed), seed)``, or the weights kept under ``--cache`` by an earlier run."""
    path = Path(args.cache) / f"{name}_{seed}.pt" if args.cache else None
    if path is not None and path.exists():
        net = build(seed)
        net.load_state_dict(torch.load(path, weights_only=True))
        return net.eval()
    net = fit(build(seed), seed)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), path)
    return net


def _vit_trained(args: argparse.Namespace) -> tuple:
    import itertools

    import timm

    from permask.data.loader import get_loaders

    train_loader, test_loader, _ = get_loaders(
        "fashion_mnist", None, batch_size=128, train_subset=args.vit_subset
    )

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=4, in_chans=1,
                                 embed_dim=64, depth=4, num_heads=4, num_classes=10)  # fmt: skip

    def fit(net: nn.Module, seed: int) -> nn.Module:
        net = net.to(args.device)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05)
        steps = args.vit_epochs * len(train_loader)
        factor = warmup_cosine(steps) if args.schedule == "cosine" else (lambda s: 1.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        loader = train_loader.replace(seed=seed)
        for epoch in range(args.vit_epochs):
            loader.set_epoch(epoch)
            for x, y in loader:
                opt.zero_grad()
                nn.functional.cross_entropy(net(x.to(args.device)), y.to(args.device)).backward()
                opt.step()
                schedule.step()
        return net.cpu().eval()

    t0 = time.perf_counter()
    a, b = (
        _trained(args, f"vit_{args.vit_epochs}_{args.vit_subset}{_recipe(args, lm=False)}", seed,
                 build, fit)
        for seed in args.seeds
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    stats = train_loader.replace(seed=0, augment=False)
    match = list(itertools.islice(stats, args.match_batches))
    return a, b, match, permask.trace(a, match[0][0][:2]), test_loader, seconds


def vit_pair(args: argparse.Namespace) -> dict:
    """Two timm ViTs on Fashion-MNIST: the same measurements as :func:`pair`."""
    a, b, match, graph, test_loader, seconds = trained_pair("vit", args)
    row: dict = {"kind": "vit", "dim": 64, "depth": 4, "epochs": args.vit_epochs,
                 "schedule": args.schedule, "seeds": args.seeds, "train_seconds": seconds,
                 **_device(args)}  # fmt: skip
    row["acc"] = [permask.metrics.evaluate(m, test_loader)[1] for m in (a, b)]
    curve = dict(alphas=11, bn_loader=match, max_batches=args.vit_test_batches)
    row["naive"] = {"barrier": interpolate(a, b, test_loader, **curve)["barrier"]}

    def barriers(x: nn.Module, y: nn.Module) -> dict:
        return {
            "barrier": interpolate(x, y, test_loader, **curve)["barrier"],
            "repair": interpolate(x, y, test_loader, repair=True, graph=graph, **curve)["barrier"],
        }

    for method in ("weight", "activation", "ste"):
        data_for = {"weight": None, "activation": match, "ste": match * args.ste_passes}
        t0 = time.perf_counter()
        pi = permask.align(a, b, data_for[method], method=method, graph=graph)
        seconds = time.perf_counter() - t0
        moved = permask.permute_model(a, pi, graph)
        row[method] = {**barriers(moved, b), "seconds": seconds}
        print("vit", method, row[method], flush=True)
        turns = _rotated(method, moved, b, graph, row, data_for[method] or match,
                         data_for["ste"])  # fmt: skip
        for name, (x, y, extra) in turns.items():
            row[name] = {**barriers(x, y), **extra}
            print("vit", name, row[name], flush=True)
    return row


def _recipe(args: argparse.Namespace, lm: bool = True) -> str:
    """The training recipe's part of a cached model's name ("" for the constant rate without
    weight decay the first cached language models had; the ViT's decay is its own)."""
    if args.schedule == "constant" and (args.weight_decay == 0 or not lm):
        return ""
    return f"_{args.schedule}" + (f"_wd{args.weight_decay:g}" if lm else "")


def stdlib_corpus(megabytes: float) -> torch.Tensor:
    """The first ``megabytes`` of the standard library's Python source (its files in sorted
    order, tests left out): text enough for larger language models."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    out, size = [], 0
    for path in sorted(root.rglob("*.py")):
        if {"test", "tests", "idle_test", "site-packages"} & set(path.relative_to(root).parts):
            continue
        text = path.read_bytes()
        out.append(text)
        size += len(text)
        if size >= megabytes * 2**20:
            break
    return torch.tensor(list(b"\n".join(out)[: int(megabytes * 2**20)]), dtype=torch.long)


def _shape(kind: str, args: argparse.Namespace) -> str:
    """The heads' and corpus' part of a cached language model's name ("" for the defaults)."""
    corpus = "" if args.corpus == "modules" else f"_stdlib{args.corpus_mb:g}"
    return _heads(kind, args) + corpus


def _heads(kind: str, args: argparse.Namespace) -> str:
    """The heads' part of :func:`_shape` ("" for the default 4 heads, 2 of them key/value)."""
    if args.heads == 4 and (kind == "gpt2" or args.kv_heads == 2):
        return ""
    return f"_h{args.heads}" + ("" if kind == "gpt2" else f"kv{args.kv_heads}")


def _extras(kind: str, args: argparse.Namespace) -> dict:
    """The settings a row records where they are not the defaults its first rows had."""
    out = {"heads": args.heads, "kv_heads": args.kv_heads} if _heads(kind, args) else {}
    if args.corpus != "modules":
        out.update(corpus=args.corpus, corpus_mb=args.corpus_mb)
    return {**out, **_device(args)}


def _device(args: argparse.Namespace) -> dict:
    """The device a row records where its models trained off the CPU."""
    return {} if args.device == "cpu" else {"device": args.device}


def _lm_batches(data: list[dict]) -> list[dict]:
    """Dict batches with ``labels`` (the model's own next-token loss), for STE."""
    return [{"input_ids": d["input_ids"], "labels": d["input_ids"]} for d in data]


def _barriers(a: nn.Module, b: nn.Module, test: list, bn: list[dict], graph) -> dict:
    """Loss barrier of the path a -> b on ``test`` (11 points), and with REPAIR if ``graph``."""
    common = dict(alphas=11, bn_loader=as_classification(bn))
    out = {"barrier": interpolate(NextToken(a), NextToken(b), test, **common)["barrier"]}
    if graph is not None:
        curve = interpolate(NextToken(a), NextToken(b), test, repair=True, graph=graph, **common)
        out["repair"] = curve["barrier"]
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    kinds = ["vit", "gpt2", "llama"]
    p.add_argument("--kinds", nargs="+", default=kinds, choices=kinds)
    p.add_argument("--vit-epochs", type=int, default=3, help="ViT training epochs")
    p.add_argument("--vit-subset", type=int, default=20000, help="ViT training images")
    p.add_argument("--vit-test-batches", type=int, default=2, help="test batches of 1000")
    p.add_argument("--steps", type=int, default=600, help="training steps per model")
    p.add_argument("--seeds", type=int, nargs=2, default=[1, 2], help="the two models' seeds")
    p.add_argument(
        "--schedule",
        choices=["cosine", "constant"],
        default="cosine",
        help="learning rate: warmup then cosine decay to zero, or constant",
    )
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW's, language models")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--match-batches", type=int, default=20, help="batches of 16 to match on")
    p.add_argument("--ste-passes", type=int, default=3, help="passes of STE over them")
    p.add_argument("--no-save", action="store_true", help="print only")
    p.add_argument("--cache", help="folder to keep the trained models in and reuse them from")
    p.add_argument("--heads", type=int, default=4, help="attention heads, language models")
    p.add_argument("--kv-heads", type=int, default=2, help="the Llama's key/value heads")
    p.add_argument("--corpus", choices=["modules", "stdlib"], default="modules",
                   help="four stdlib modules' source, or the whole library's")  # fmt: skip
    p.add_argument("--corpus-mb", type=float, default=16, help="megabytes of --corpus stdlib")
    p.add_argument("--device", default="cpu", help="where the models train (cuda on a GPU); "
                   "matching and the barriers run on the CPU")  # fmt: skip
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    return p


def append_row(path: Path, row: dict) -> None:
    """``row`` with torch's version and the date, as one more JSON line of ``path``."""
    with path.open("a") as f:
        f.write(json.dumps({**row, "torch": torch.__version__, "date": time.strftime("%F")}) + "\n")


def defaults(**override) -> argparse.Namespace:
    """This benchmark's settings (its defaults, with ``override``), for other benchmarks."""
    return argparse.Namespace(**{**vars(_parser().parse_args([])), **override})


def main() -> None:
    p = _parser()
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    for kind in args.kinds:
        row = vit_pair(args) if kind == "vit" else pair(kind, args)
        naive = row["naive"]["barrier"]
        for method, cell in row.items():
            if isinstance(cell, dict) and method != "naive":
                for key in ("barrier", "repair"):
                    cell[f"{key}_ratio"] = cell[key] / naive
        print(json.dumps(row), flush=True)
        if not args.no_save:
            append_row(RESULTS, row)


if __name__ == "__main__":
    main()
