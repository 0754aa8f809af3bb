"""Coverage sweep over timm's zoo: trace, permute at random, compare outputs.

For every architecture in ``timm.list_models()`` with at most ``--max-params`` parameters
(random init, no downloads, 10 classes, small input where the model allows), record: traced?,
max relative output error after a random permutation (float64, eval mode), fraction of
parameters moved, number of groups, top freeze reasons, tracing seconds. Results are appended
to a JSON-lines file as they come, so an interrupted sweep resumes where it stopped;
``--summarize`` writes the summary (rates, per-family table, top freeze reasons) to
docs/coverage.md.

    python benchmarks/timm_coverage.py --out benchmarks/results/timm_coverage.jsonl
    python benchmarks/timm_coverage.py --out benchmarks/results/timm_coverage.jsonl --summarize
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import signal
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn as nn

import permask
from permask.testing import equivalence_error, perturb_

TOL = 1e-5
END = "<!-- end of the timm coverage summary: what follows is kept -->"


def family(name: str) -> str:
    return re.split(r"[_\d]", name, maxsplit=1)[0] or name


def count_params(name: str) -> int:
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=10)
    return sum(p.numel() for p in model.parameters())


def build(name: str, size: int) -> tuple[nn.Module, torch.Tensor]:
    """The model at a small input size if it accepts ``img_size``, else its default size."""
    for kwargs in ({"img_size": size}, {}):
        try:
            model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
        except TypeError:
            continue
        cfg = model.pretrained_cfg.get("input_size", (3, 224, 224))
        side = kwargs.get("img_size", cfg[-1])
        x = torch.randn(2, cfg[0], side, side, generator=torch.Generator().manual_seed(0))
        try:
            with torch.no_grad():
                model.eval()(x)
        except Exception:
            if kwargs:
                continue
            raise
        return model, x
    raise RuntimeError(f"cannot build {name}")


def check(name: str, size: int) -> dict:
    rec: dict = {"model": name, "family": family(name)}
    model, x = build(name, size)
    model, x = perturb_(model.double().eval()), x.double()
    rec["input"] = x.shape[-1]
    rec["params"] = sum(p.numel() for p in model.parameters())
    t = time.perf_counter()
    try:
        graph = permask.trace(model, x)
    except Exception as e:  # the model ran eagerly on x in build(): any failure is the tracer's
        rec.update(traced=False, error=f"{type(e).__name__}: {str(e)[:300]}")
        return rec
    rec["trace_s"] = round(time.perf_counter() - t, 3)
    pi = permask.random_permutation(graph, torch.Generator().manual_seed(1))
    err = equivalence_error(model, x, pi, graph)
    reasons = collections.Counter()
    for f in graph.frozen:
        if f.kind == "tensor" and f.reasons:
            reasons[f.reasons[0].message] += 1
    rec.update(
        traced=True,
        rel_err=err,
        ok=bool(err <= TOL),
        moved=round(graph.permutable_fraction, 4),
        groups=len(graph),
        freeze_reasons=dict(reasons.most_common(5)),
    )
    return rec


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout()


def guarded(rec: dict, work, timeout: int, out: Path) -> dict:
    """``rec`` updated by ``work()``, or by why it was skipped (timeout, any error: recorded,
    not fatal, the sweep goes on), with its seconds; appended to ``out`` as one JSON line."""
    start = time.perf_counter()
    signal.alarm(timeout)
    try:
        rec.update(work())
    except Timeout:
        rec.update(skipped=f"timeout after {timeout} s")
    except Exception as e:
        rec.update(skipped=f"{type(e).__name__}: {str(e)[:200]}")
    finally:
        signal.alarm(0)
    rec["seconds"] = round(time.perf_counter() - start, 2)
    with out.open("a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec


def sweep(args: argparse.Namespace) -> None:
    from permask.graph.rules.timm_layers import MISSING_TIMM_NAMES

    if MISSING_TIMM_NAMES:  # a rule that misses its class would only show up as freezes
        sys.exit(f"timm {timm.__version__} lacks what permask's rules name: {MISSING_TIMM_NAMES}")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {json.loads(line)["model"] for line in out.open()} if out.exists() else set()
    k, n_shards = map(int, args.shard.split("/"))
    names = [n for n in timm.list_models()[k::n_shards] if n not in done]
    if args.limit:
        names = names[: args.limit]
    signal.signal(signal.SIGALRM, _alarm)
    for i, name in enumerate(names):

        def work(name: str = name) -> dict:
            n = count_params(name)
            if n > args.max_params:
                return {"skipped": f"{n / 1e6:.0f}M parameters"}
            return check(name, args.size)

        rec = guarded({"model": name, "family": family(name)}, work, args.timeout, out)
        status = rec.get("skipped") or ("ok" if rec.get("ok") else rec.get("error", "MISMATCH"))
        print(f"[{i + 1}/{len(names)}] {name}: {status}", flush=True)


def summarize(args: argparse.Namespace) -> None:
    recs = [json.loads(line) for line in Path(args.out).open()]
    tested = [r for r in recs if "skipped" not in r]
    traced = [r for r in tested if r.get("traced")]
    ok = [r for r in traced if r.get("ok")]
    bad = [r for r in traced if not r.get("ok")]
    moved = [r["moved"] for r in traced]
    times = [r["trace_s"] for r in traced]
    skipped = collections.Counter(
        "too large" if "parameters" in r["skipped"] else r["skipped"].split(":")[0]
        for r in recs
        if "skipped" in r
    )
    lines = [
        "# timm coverage sweep",
        "",
        "Produced by `python benchmarks/timm_coverage.py --size 32 --shard k/2` (k = 0, 1, "
        f"resumable) then `python {' '.join(sys.argv)}`, from `{args.out}` "
        f"(timm {timm.__version__}, torch {torch.__version__}, 2-core CPU, float64, eval mode, "
        "random init perturbed so zero-initialised layers matter, 10 classes, small inputs "
        "where the model accepts `img_size`).",
        "",
        f"- architectures recorded: {len(recs)} of {len(timm.list_models())} in "
        f"`timm.list_models()` ({len(tested)} tested; skipped: {dict(skipped)})"
        + (
            "; **the sweep is incomplete**: the same command continues it"
            if len(recs) < len(timm.list_models())
            else ""
        ),
        f"- traced: {len(traced)}/{len(tested)} = {len(traced) / max(len(tested), 1):.1%}",
        f"- traced and equivalent (rel. error <= {TOL}): {len(ok)}/{len(tested)} = "
        f"{len(ok) / max(len(tested), 1):.1%}",
        f"- outputs changed by a permutation: {len(bad)}"
        + (": " + ", ".join(f"{r['model']} ({r['rel_err']:.1e})" for r in bad) if bad else ""),
        f"- fraction of parameters moved: median {statistics.median(moved):.3f}, "
        f"10th percentile {statistics.quantiles(moved, n=10)[0]:.3f}"
        if len(moved) > 1
        else "- fraction moved: n/a",
        f"- tracing time: median {statistics.median(times):.2f} s, max {max(times):.1f} s"
        if times
        else "- tracing time: n/a",
        "",
        "## Per family",
        "",
        "| family | tested | traced | equivalent | median moved | median trace s |",
        "|---|---|---|---|---|---|",
    ]
    fams: dict[str, list] = collections.defaultdict(list)
    for r in tested:
        fams[r["family"]].append(r)
    for fam in sorted(fams):
        rs = fams[fam]
        tr = [r for r in rs if r.get("traced")]
        lines.append(
            f"| {fam} | {len(rs)} | {len(tr)} | {sum(r.get('ok', False) for r in tr)} | "
            f"{statistics.median([r['moved'] for r in tr]):.3f} | "
            f"{statistics.median([r['trace_s'] for r in tr]):.2f} |"
            if tr
            else f"| {fam} | {len(rs)} | 0 | 0 | - | - |"
        )
    reasons: collections.Counter = collections.Counter()
    for r in traced:
        reasons.update(r.get("freeze_reasons", {}))
    lines += ["", "## Top freeze reasons (frozen tensor axes, all models)", ""]
    lines += [f"- {n} x {msg}" for msg, n in reasons.most_common(15)]
    low = sorted((r for r in traced if r["moved"] < 0.9), key=lambda r: r["moved"])
    if low:
        lines += [
            "",
            f"## Least moved: {len(low)} architectures below 90% of parameters moved",
            "",
            "| model | moved | top freeze reason (frozen tensor axes) |",
            "|---|---|---|",
        ]
        for r in low:
            top = max(r["freeze_reasons"].items(), key=lambda kv: kv[1], default=("-", 0))
            lines.append(f"| {r['model']} | {r['moved']:.3f} | {top[0]} ({top[1]}) |")
    failed = [r for r in tested if not r.get("traced")]
    if failed:
        lines += ["", "## Not traced", ""]
        lines += [f"- {r['model']}: {r.get('error', '')[:160]}" for r in failed]
    doc = Path(args.doc)  # the sections after END (Hugging Face, recovery) are kept
    rest = doc.read_text().partition(END)[2] if doc.exists() else ""
    doc.write_text("\n".join(lines) + f"\n\n{END}" + (rest or "\n"))
    print("\n".join(lines[:16]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/timm_coverage.jsonl")
    p.add_argument("--doc", default="docs/coverage.md")
    p.add_argument("--max-params", type=float, default=100e6)
    p.add_argument("--size", type=int, default=64, help="img_size for models that accept it")
    p.add_argument("--timeout", type=int, default=300, help="seconds per model")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--limit", type=int, default=0)
    p.add_argument(
        "--shard", default="0/1", help="k/n: every n-th model from the k-th (parallel sweeps)"
    )
    p.add_argument("--summarize", action="store_true")
    args = p.parse_args()
    summarize(args) if args.summarize else sweep(args)


if __name__ == "__main__":
    main()
