"""Recovery sweep over timm: plant a permutation, recover it by weight and activation matching.

For the smallest traced-and-equivalent architecture of each timm family in the coverage sweep
(``benchmarks/results/timm_coverage.jsonl``; ``--all`` for every one of them), up to
``--max-params``: B = a random permutation of A (random init, BatchNorm statistics perturbed
by :func:`permask.testing.perturb_` so that channels differ) plus 1e-3 relative noise; then
``permask.align(A, B)`` by each method (activation matching on ``--batches`` random batches).
Recorded per architecture and method: fraction of groups recovered exactly, weight distance
after / before, seconds, and the groups missed with their layout kind (``plain``: the group
alone on its axes; ``nested``: it shares an axis with other groups, blocks x within) and, for
activation matching, whether the data left them constant or unobserved (``unmatched``).
Results are appended to a JSON-lines file as they come (an interrupted sweep resumes);
``--shard k/n`` splits the work; ``--summarize`` writes the summary into docs/coverage.md.

    python benchmarks/recovery.py --out benchmarks/results/recovery.jsonl
    python benchmarks/recovery.py --out benchmarks/results/recovery.jsonl --summarize
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timm_coverage import _alarm, build, guarded  # noqa: E402

import permask  # noqa: E402
from permask.graph.layout import GroupAxis  # noqa: E402
from permask.testing import perturb_  # noqa: E402

MARK = "<!-- recovery sweep -->"
METHODS = ("weight", "activation")


def sample(coverage: Path, every: bool, max_params: float) -> list[str]:
    """Architectures the coverage sweep traced without corruption: all, or the smallest per
    family; at most ``max_params`` parameters."""
    ok = [json.loads(line) for line in coverage.open()]
    ok = [r for r in ok if r.get("ok") and r["params"] <= max_params]
    if every:
        return [r["model"] for r in ok]
    smallest: dict[str, dict] = {}
    for r in ok:
        if r["family"] not in smallest or r["params"] < smallest[r["family"]]["params"]:
            smallest[r["family"]] = r
    return sorted(r["model"] for r in smallest.values())


def kind(graph, name: str) -> str:
    """``plain`` if the group is alone on every axis it moves, else ``nested``."""
    group = graph[name]
    alone = all(isinstance(m.layout, GroupAxis) for m in group.members)
    return "plain" if alone else "nested"


def _distance(model_a, model_b) -> float:
    pairs = zip(model_a.state_dict().values(), model_b.state_dict().values())
    return sum(float((x.double() - y.double()).pow(2).sum()) for x, y in pairs) ** 0.5


def check(name: str, size: int, batches: int, methods=METHODS) -> dict:
    torch.manual_seed(0)  # timm's init: the same model whatever ran before it in the process
    a, x = build(name, size)
    a = perturb_(a.eval())
    graph = permask.trace(a, x)
    g = torch.Generator().manual_seed(1)
    pi = permask.random_permutation(graph, g)
    b = permask.permute_model(a, pi, graph)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(1e-3 * p.std().nan_to_num() * torch.randn(p.shape, generator=g))
    before = _distance(a, b)
    data = [(torch.randn(8, *x.shape[1:], generator=g), torch.zeros(8)) for _ in range(batches)]
    rec = {"groups": len(graph), "params": sum(p.numel() for p in a.parameters())}
    for method in methods:
        t = time.perf_counter()
        try:
            got, info = permask.align(a, b, data, method=method, graph=graph, return_info=True)
        except Exception as e:  # recorded per method: the other method's result is kept
            rec[method] = {"skipped": f"{type(e).__name__}: {str(e)[:200]}"}
            continue
        seconds = time.perf_counter() - t
        wrong = [k for k in pi if not torch.equal(got[k], pi[k])]
        after = _distance(permask.permute_model(a, got, graph), b)
        constant = {k for key in info.constant for k in key.split(" x ")}
        rec[method] = {
            "exact": round(1 - len(wrong) / max(len(pi), 1), 4),
            "residual": round(after / before, 4) if before else 0.0,
            "seconds": round(seconds, 2),
            "missed": {k: _why(graph, k, constant, info.unmatched) for k in wrong},
            # missed groups the user is not warned about: a positive margin (a certified
            # optimum of the scores) and no constant channel
            "silent": [k for k in wrong if info.margins.get(k, 0.0) > 0 and k not in constant],
        }
    return rec


def _why(graph, group: str, constant: set[str], unmatched: tuple[str, ...]) -> str:
    why = kind(graph, group)
    if group in constant:
        why += ", constant on the data"
    if group in unmatched:
        why += ", unobserved (weights)"
    return why


def sweep(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set(_records(out)) if out.exists() and not args.redo else set()
    k, n_shards = map(int, args.shard.split("/"))
    names = args.models or sample(Path(args.coverage), args.all, args.max_params)[k::n_shards]
    names = [n for n in names if n not in done][: args.limit or None]
    signal.signal(signal.SIGALRM, _alarm)
    for i, name in enumerate(names):
        work = functools.partial(check, name, args.size, args.batches, args.methods)
        rec = guarded({"model": name}, work, args.timeout, out)
        status = rec.get("skipped") or " ".join(
            f"{m} {rec[m].get('skipped') or format(rec[m]['exact'], '.0%')}" for m in args.methods
        )
        print(f"[{i + 1}/{len(names)}] {name}: {status}", flush=True)


def _records(out: Path) -> dict[str, dict]:
    """Per architecture, its lines merged in file order, method by method: a later result
    replaces an earlier one, a later skip (a whole line's skip counts for every method) does
    not replace a result (``--redo --methods weight`` reruns one method on top of a sweep)."""
    recs: dict[str, dict] = {}
    for line in out.open():
        r = json.loads(line)
        if "skipped" in r:
            why = r.pop("skipped")
            r.update({m: {"skipped": why} for m in METHODS})
        old = recs.setdefault(r["model"], {})
        for k, v in r.items():
            if k not in METHODS or "skipped" not in v or "exact" not in old.get(k, {}):
                old[k] = v
    return recs


def summarize(args: argparse.Namespace) -> None:
    recs = list(_records(Path(args.out)).values())
    methods = [m for m in METHODS if any(m in r for r in recs)]
    lines = [MARK, "", "## Recovery of planted permutations (benchmarks/recovery.py)", ""]
    lines.append(
        f"{len(recs)} architectures. Per method: architectures aligned, skipped (timeout or "
        "error), with every group recovered exactly, mean fraction of groups exact, mean "
        "weight distance after / before:"
    )
    head = "| method | aligned | skipped | all groups exact | groups exact (mean) | residual (mean) | s (median) |"  # noqa: E501
    lines += ["", head]
    lines.append("|---|---|---|---|---|---|---|")
    done = {m: [r for r in recs if "exact" in r.get(m, {})] for m in methods}
    for m in methods:
        rs = [r[m] for r in done[m]]
        full = sum(r["exact"] == 1 for r in rs)
        secs = sorted(r["seconds"] for r in rs)
        lines.append(f"| {m} | {len(rs)} | {len(recs) - len(rs)} | {full}/{len(rs)} | "
                     f"{sum(r['exact'] for r in rs) / len(rs):.4f} | "
                     f"{sum(r['residual'] for r in rs) / len(rs):.4f} | "
                     f"{secs[len(secs) // 2]:.1f} |")  # fmt: skip
    lines += ["", "Missed groups by layout kind and cause:", ""]
    causes = collections.Counter(
        (m, why) for m in methods for r in done[m] for why in r[m]["missed"].values()
    )
    lines += [f"- {m}: {why}: {n}" for (m, why), n in sorted(causes.items())] or ["- none"]
    for m in methods:
        known = [r[m] for r in done[m] if "silent" in r[m]]
        silent = sum(len(r["silent"]) for r in known)
        lines.append(f"- {m}: missed with a positive margin and no constant channel (not "
                     f"flagged to the user): {silent} (recorded for {len(known)} "
                     "architectures)")  # fmt: skip
    skipped = [(r["model"], m, r.get(m, {}).get("skipped")) for r in recs for m in methods]
    lines += ["", "Skipped:", ""]
    lines += [f"- `{name}` ({m}): {why}" for name, m, why in skipped if why] or ["- none"]
    lines += ["", "Architectures with a missed group:", ""]
    for r in recs:
        for m in methods:
            if r.get(m, {}).get("missed"):
                example = next(iter(r[m]["missed"]))
                lines.append(f"- `{r['model']}` ({m}): {r[m]['exact']:.1%} exact, residual "
                             f"{r[m]['residual']:.3f}, e.g. {example}")  # fmt: skip
    lines.append(MARK)
    doc = Path(args.doc)
    text = doc.read_text()
    head, _, rest = text.partition(MARK)
    tail = rest.partition(MARK)[2] if rest else ""
    doc.write_text(head.rstrip() + "\n\n" + "\n".join(lines) + "\n" + tail.lstrip("\n"))
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/recovery.jsonl")
    p.add_argument("--coverage", default="benchmarks/results/timm_coverage.jsonl")
    p.add_argument("--doc", default="docs/coverage.md")
    p.add_argument("--all", action="store_true", help="every architecture, not one per family")
    p.add_argument("--max-params", type=float, default=30e6)
    p.add_argument("--size", type=int, default=64, help="img_size for models that accept it")
    p.add_argument("--batches", type=int, default=4, help="random batches of 8 for activation")
    p.add_argument("--timeout", type=int, default=300, help="seconds per model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--shard", default="0/1", help="k/n: every n-th architecture from the k-th")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--redo", action="store_true", help="rerun architectures already in --out")
    p.add_argument("--models", nargs="+", help="these architectures instead of the sample")
    p.add_argument("--summarize", action="store_true")
    args = p.parse_args()
    summarize(args) if args.summarize else sweep(args)


if __name__ == "__main__":
    main()
