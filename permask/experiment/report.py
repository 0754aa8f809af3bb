"""Results of a run: the table (Table 1 of the paper), files (md, csv, json) and PNG plots.

Rows: ``dense`` (the B models, one per seed), ``imp`` (IMP's pruned and fine-tuned A), and for
every sparsity and rewind point ``lth``, ``permuted``, ``naive``. Each row has the test accuracy
mean and sample std over its models and, over the same models, the ensemble accuracy,
disagreement, KL and JS of :func:`permask.metrics.ensemble_metrics` (``nan`` for one model).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from permask._atomic import atomic_path, atomic_write_bytes
from permask.experiment.config import RunConfig
from permask.metrics import ensemble_metrics, plot_interpolation

__all__ = ["Results", "collect", "write_report"]

COLUMNS = (
    "method",
    "sparsity",
    "rewind",
    "models",
    "acc_mean",
    "acc_std",
    "ensemble_acc",
    "disagreement",
    "kl",
    "js",
    "train_seconds",
)


@dataclass
class Results:
    """The results table (``rows``, accuracies in %) and interpolation barriers per seed."""

    rows: list[dict[str, Any]]
    interpolation: dict[str, list[float]] = field(default_factory=dict)  # method -> barriers
    curves: dict[str, Any] = field(default_factory=dict)  # seed 0's curves, for the plot
    notes: list[str] = field(default_factory=list)  # warnings about the run, printed below
    interpolation_seconds: list[float] = field(default_factory=list)  # the stage, per seed
    stages: list[dict[str, Any]] = field(default_factory=list)  # the plan's estimates and times

    def row(self, method: str, sparsity: float | None = None, rewind: int | None = None) -> dict:
        """The row of ``method`` (at ``sparsity`` and ``rewind`` where they apply)."""
        for r in self.rows:
            if (r["method"], r["sparsity"], r["rewind"]) == (method, sparsity, rewind):
                return r
        raise KeyError((method, sparsity, rewind))

    def markdown(self) -> str:
        head = "| method | sparsity | k | models | test acc (%) | ensemble acc (%) | disagreement "
        lines = [head + "| KL | JS |", "|---|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            sparsity = "" if r["sparsity"] is None else f"{100 * r['sparsity']:g}%"
            rewind = "" if r["rewind"] is None else str(r["rewind"])
            acc = f"{r['acc_mean']:.2f} ± {r['acc_std']:.2f}"
            cells = [
                r["method"],
                sparsity,
                rewind,
                str(r["models"]),
                acc,
                _num(r["ensemble_acc"], 2),
                _num(r["disagreement"], 3),
                _num(r["kl"], 3),
                _num(r["js"], 3),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        if self.interpolation:
            parts = [f"{m} {_mean(b):.3f}" for m, b in self.interpolation.items()]
            lines.append("")
            lines.append("Interpolation loss barrier to B (mean over seeds): " + ", ".join(parts))
        if self.interpolation_seconds:
            each = ", ".join(f"{s:.0f}" for s in self.interpolation_seconds)
            lines.append(f"Interpolation stage: {each} s (per seed)")
        if self.stages:
            lines.append(_estimates(self.stages))
        lines += [f"\n**Warning:** {note}" for note in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.markdown()


def _estimates(stages: list[dict[str, Any]]) -> str:
    """The plan's estimate of the stages run by the last invocation against their times."""
    done = [s for s in stages if s["seconds"] is not None]
    est, took = sum(s["estimate_seconds"] for s in done), sum(s["seconds"] for s in done)
    return (
        f"Stages run by the last invocation: {len(done)}, estimated {est:.0f} s, took {took:.0f} s"
    )


def _num(x: float, digits: int) -> str:
    return "–" if math.isnan(x) else f"{x:.{digits}f}"


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def collect(run_dir: Path, cfg: RunConfig, labels: torch.Tensor, num_classes: int) -> Results:
    """Read every model's ``eval.pt`` and interpolation curves of a finished run."""
    a_seeds = sorted({0 if cfg.shared_a else s for s in range(cfg.seeds)})
    seeds = range(cfg.seeds)
    groups: dict[tuple, list[Path]] = {
        ("dense", None, None): [run_dir / f"seed{s}" / "dense_b" / "eval.pt" for s in seeds]
    }
    for sp in cfg.sparsity:
        groups[("imp", sp, None)] = [
            run_dir / f"seed{a}" / "imp" / f"s{sp:g}" / "eval.pt" for a in a_seeds
        ]
    for sp in cfg.sparsity:
        for k in cfg.rewind:
            for method in ("lth", "permuted", "naive"):
                name = f"{method}_s{sp:g}_k{k}"
                groups[(method, sp, k)] = [
                    run_dir / f"seed{s}" / "sparse" / name / "eval.pt" for s in seeds
                ]
    rows = [_row(key, paths, labels) for key, paths in groups.items()]
    barriers: dict[str, list[float]] = {"naive": [], "permuted": []}
    curves, seconds = {}, []
    for s in seeds:
        data = json.loads((run_dir / f"seed{s}" / "interpolation.json").read_text())
        for method in barriers:
            barriers[method].append(data[method]["barrier"])
        if "seconds" in data:  # runs before 2026-12-04 did not record it
            seconds.append(data["seconds"])
        curves = curves or data
    return Results(rows, barriers, curves, _notes(rows, num_classes), seconds)


def _notes(rows: list[dict[str, Any]], num_classes: int) -> list[str]:
    """Warn when dense B stayed near chance: every comparison of such a run is noise."""
    chance = 100 / num_classes
    dense = next(r for r in rows if r["method"] == "dense")["acc_mean"]
    if dense >= chance + 0.1 * (100 - chance):
        return []
    return [
        f"dense B reached only {dense:.1f}% test accuracy, near chance ({chance:.1f}%): the "
        "models barely learned, so the comparisons above say little. Train longer (--epochs, "
        "--train-subset) or check the learning rate."
    ]


def _row(key: tuple, paths: list[Path], labels: torch.Tensor) -> dict[str, Any]:
    evals = [torch.load(p, weights_only=True) for p in paths]
    m = ensemble_metrics([e["probs"] for e in evals], labels)
    method, sparsity, rewind = key
    return {
        "method": method,
        "sparsity": sparsity,
        "rewind": rewind,
        "models": len(evals),
        "acc_mean": 100 * m["acc_mean"],
        "acc_std": 100 * m["acc_std"],
        "ensemble_acc": 100 * m["ensemble_acc"],
        "disagreement": m["disagreement"],
        "kl": m["kl"],
        "js": m["js"],
        "train_seconds": sum(e["seconds"] for e in evals),
    }


def write_report(run_dir: Path, cfg: RunConfig, results: Results, seconds: float) -> None:
    """Write ``results.{md,csv,json}``, ``accuracy.png`` and ``interpolation.png``."""
    settings = ", ".join(f"{k}={v}" for k, v in cfg.results_key().items())
    md = f"# permask run: {cfg.model} on {cfg.dataset}\n\n{results.markdown()}\n\n"
    md += f"Settings: {settings}\n\nWall time of the last invocation: {seconds / 60:.1f} min\n"
    atomic_write_bytes(md.encode(), run_dir / "results.md")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(results.rows)
    atomic_write_bytes(buf.getvalue().encode(), run_dir / "results.csv")
    blob = {
        "config": cfg.results_key(),
        "rows": results.rows,
        "interpolation_barriers": results.interpolation,
        "interpolation_seconds": results.interpolation_seconds,
        "stages": results.stages,
        "notes": results.notes,
        "wall_seconds": seconds,
    }
    atomic_write_bytes(json.dumps(blob, indent=1).encode(), run_dir / "results.json")
    _plot_accuracy(results, cfg, run_dir / "accuracy.png")
    if results.curves:
        curves = {"A -> B": results.curves["naive"], "pi(A) -> B": results.curves["permuted"]}
        plot_interpolation(
            curves, run_dir / "interpolation.png", title=f"{cfg.model} on {cfg.dataset}, seed 0"
        )


def _plot_accuracy(results: Results, cfg: RunConfig, path: Path) -> None:
    """Test accuracy against sparsity per method, one panel per rewind point."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    fig = Figure(figsize=(4.5 * len(cfg.rewind), 3.5))
    axes = fig.subplots(1, len(cfg.rewind), squeeze=False)[0]
    dense = results.row("dense")
    xs = [100 * s for s in cfg.sparsity]
    for ax, k in zip(axes, cfg.rewind):
        ax.axhline(dense["acc_mean"], color="grey", linestyle="--", label="dense")
        for method in ("imp", "lth", "permuted", "naive"):
            rows = [results.row(method, s, None if method == "imp" else k) for s in cfg.sparsity]
            ax.errorbar(
                xs,
                [r["acc_mean"] for r in rows],
                yerr=[r["acc_std"] for r in rows],
                marker="o",
                capsize=3,
                label=method,
            )
        ax.set(xlabel="sparsity (%)", ylabel="test accuracy (%)", title=f"rewind k={k}")
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
