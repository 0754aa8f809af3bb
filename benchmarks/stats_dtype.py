"""Activation matching's statistics in float32 against float64, on trained pairs.

The trained pairs of ``benchmarks/transformer_pairs.py`` (a timm ViT on Fashion-MNIST, a
byte-level GPT-2-style and a Llama-style language model; ``--cache`` reuses its trained models),
one pass of each model pair over the matching batches with both dtypes: the largest difference
of any correlation, the groups whose permutation differs, and the memory of each. One JSON line
per pair is appended to ``benchmarks/results/stats_dtype.jsonl``.

    python benchmarks/stats_dtype.py --cache /tmp/tpcache      # reuses transformer_pairs' pairs

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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import transformer_pairs as tp  # noqa: E402

import permask  # noqa: E402
from permask.match.by_activation import observe  # noqa: E402
from permask.match.points import plan_points  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "stats_dtype.jsonl"


def compare(a, b, data, graph) -> dict:
    """Correlations and permutations of one pass in float64 and in float32."""
    plan = plan_points(graph)
    out: dict = {"tokens_or_samples": 0}
    scores = {}
    for name, dtype in (("float64", torch.float64), ("float32", torch.float32)):
        t0 = time.perf_counter()
        stats, _, samples = observe(a, b, graph, plan, data, torch.device("cpu"), None, dtype)
        scores[name] = stats.scores()
        out[f"{name}_seconds"] = time.perf_counter() - t0
        out[f"{name}_bytes"] = plan.stats_bytes(dtype.itemsize)
        out["tokens_or_samples"] = min((c for row in stats.count for c in row), default=0)
    diff = max(float((scores["float64"][k] - scores["float32"][k].double()).abs().max())
               for k in scores["float64"])  # fmt: skip
    pis = {}
    for name in scores:
        pis[name] = permask.align(a, b, data, graph=graph, stats_dtype=name)
    differ = [g for g in pis["float64"] if not torch.equal(pis["float64"][g], pis["float32"][g])]
    return {**out, "max_abs_correlation_diff": diff, "groups": len(pis["float64"]),
            "groups_differing": len(differ)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", help="transformer_pairs.py's --cache folder (trains if empty)")
    p.add_argument("--kinds", nargs="+", default=["vit", "gpt2", "llama"])
    p.add_argument("--no-save", action="store_true")
    cli = p.parse_args()
    args = tp.defaults(cache=cli.cache)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    for kind in cli.kinds:
        a, b, match, graph, *_ = tp.trained_pair(kind, args)
        row = {"kind": kind, "schedule": args.schedule, **compare(a, b, match, graph)}
        print(json.dumps(row), flush=True)
        if not cli.no_save:
            with RESULTS.open("a") as f:
                f.write(json.dumps({**row, "torch": torch.__version__,
                                    "date": time.strftime("%F")}) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
