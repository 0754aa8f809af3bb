"""Results of a run: the table (Table 1 of the paper), files (md, csv, json) and PNG plots.

Rows: ``dense`` (the B models, one per seed), ``imp`` (IMP's pruned and fine-tuned A), and for
every sparsity and rewind point each sparse method (``lth``, ``permuted``, ``naive`` by default;
a preconditioned one as ``method/sparseopt``). Each row has the test accuracy
mean and sample std over its models and, over the same models, the ensemble accuracy,
disagreement, KL and JS of :func:`permask.metrics.ensemble_metrics` (``nan`` for one model).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from permask._atomic import atomic_path, atomic_write_bytes
from permask.experiment.config import RunConfig
from permask.experiment.methods import METHODS
from permask.experiment.paths import imp_files
from permask.experiment.stages import Stage, stages
from permask.metrics import ensemble_metrics, plot_interpolation
from permask.sparse import PRECONDITIONERS

__all__ = ["Results", "collect", "write_report", "write_paper", "paper_markdown"]

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
    """Read every model's ``eval.pt`` and interpolation curves of a finished run: the outputs
    of its stages (:func:`permask.experiment.stages.stages`), one row per model kind. Sparse
    trainings of other methods or preconditioners that an earlier invocation ran into the same
    directory get rows too, once all their seeds are done."""
    run = stages(replace(cfg, out=str(run_dir)))
    groups: dict[tuple, list[Path]] = {("dense", None, None): []}
    for sp in cfg.sparsity:
        groups[("imp", sp, None)] = []
    curves_of: list[Path] = []
    for stage in run:
        if stage.kind == "dense" and stage.role == "B":
            groups[("dense", None, None)] += stage.outputs
        elif stage.kind == "imp":
            _, evals = imp_files(cfg, stage.directory.parent)
            for sp in cfg.sparsity:
                groups[("imp", sp, None)].append(evals[sp])
        elif stage.kind == "interpolation":
            curves_of += stage.outputs
    sparse, partial = _sparse_groups(run, replace(cfg, out=str(run_dir)))
    groups.update(sparse)
    rows = [_row(key, paths, labels) for key, paths in groups.items()]
    barriers: dict[str, list[float]] = {"naive": [], "permuted": []}
    curves, seconds = {}, []
    for path in curves_of:
        data = json.loads(path.read_text())
        for method in barriers:
            barriers[method].append(data[method]["barrier"])
        if "seconds" in data:  # runs before 2026-12-04 did not record it
            seconds.append(data["seconds"])
        curves = curves or data
    return Results(rows, barriers, curves, _notes(rows, num_classes) + partial, seconds)


def _sparse_groups(run: list[Stage], cfg: RunConfig) -> tuple[dict[tuple, list[Path]], list[str]]:
    """The evaluations of each sparse row (``run``'s own, and every other method and
    preconditioner whose seeds are all done), ordered by sparsity, rewind point, preconditioner
    and method; and a note per other row that is only partly done."""
    own = {stage for stage in run if stage.kind == "sparse"}
    every = [
        stage
        for pre in ("none", *PRECONDITIONERS)
        for stage in stages(replace(cfg, methods=list(METHODS), sparse_precondition=pre))
        if stage.kind == "sparse"
    ]
    groups: dict[tuple, list[Stage]] = {}
    for stage in every:
        label = stage.method + (f"/{stage.precondition}" if stage.precondition else "")
        groups.setdefault((label, stage.sparsity, stage.rewind), []).append(stage)
    rows, notes = {}, []
    for key, members in groups.items():
        done = sum(all(p.is_file() for p in stage.outputs) for stage in members)
        if own.intersection(members) or done == len(members):
            rows[key] = [p for stage in members for p in stage.outputs]
        elif done:
            label, sp, k = key
            notes.append(f"{label} at {sp:g}, k={k}: {done} of {len(members)} seeds done (no row)")
    order = {m: i for i, m in enumerate(METHODS)}

    def rank(key: tuple) -> tuple:
        method, _, pre = key[0].partition("/")
        return key[1], key[2], pre, order[method]

    return {key: rows[key] for key in sorted(rows, key=rank)}, notes


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
    labels = list(dict.fromkeys(r["method"] for r in results.rows if r["method"] != "dense"))
    for ax, k in zip(axes, cfg.rewind):
        ax.axhline(dense["acc_mean"], color="grey", linestyle="--", label="dense")
        for label in labels:
            rows = [r for r in results.rows if r["method"] == label and r["rewind"] in (None, k)]
            ax.errorbar(
                [100 * r["sparsity"] for r in rows],
                [r["acc_mean"] for r in rows],
                yerr=[r["acc_std"] for r in rows],
                marker="o",
                capsize=3,
                label=label,
            )
        ax.set(xlabel="sparsity (%)", ylabel="test accuracy (%)", title=f"rewind k={k}")
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)


# --- against the paper: permask report RUN_DIR --paper (docs/pipeline.md) ---

_PAPER_HEAD = "## Against the paper"
_PAPER_INTRO = (
    "Test accuracy (%): measured mean over seeds, its standard error (SE = sample std / "
    "sqrt(models), – for one model), the paper's published value (± where it prints one; "
    "permask/experiment/published.py) and measured − paper."
)


def paper_comparison(results: Results, cfg: RunConfig) -> list[dict[str, Any]]:
    """Per row: measured accuracy and its standard error over seeds (std / sqrt(models), nan for
    one model), the paper's value and source (nan and "" where it has none) and the difference."""
    from permask.experiment.published import published

    out = []
    for r in results.rows:
        p = published(cfg, r["method"], r["sparsity"], r["rewind"])
        c = {k: r[k] for k in ("method", "sparsity", "rewind", "models")}
        c["acc"], c["paper"] = r["acc_mean"], p.acc if p else math.nan
        c["se"] = r["acc_std"] / math.sqrt(r["models"]) if r["models"] > 1 else math.nan
        c["paper_std"], c["source"] = (p.acc_std, p.source) if p else (None, "")
        c["diff"] = c["acc"] - c["paper"]
        out.append(c)
    return out


def paper_markdown(results: Results, cfg: RunConfig) -> str:
    """The "Against the paper" section of ``results.md``."""
    head = "| method | sparsity | k | models | measured | SE | paper | measured − paper | source |"
    lines = [_PAPER_HEAD, "", _PAPER_INTRO, "", head, "|---|---|---|---|---|---|---|---|---|"]
    rows = paper_comparison(results, cfg)
    for c in rows:
        paper = _num(c["paper"], 2) + ("" if c["paper_std"] is None else f" ± {c['paper_std']}")
        diff = "–" if math.isnan(c["diff"]) else f"{c['diff']:+.2f}"
        sparsity = "" if c["sparsity"] is None else f"{100 * c['sparsity']:g}%"
        rewind = "" if c["rewind"] is None else str(c["rewind"])
        cells = [c["method"], sparsity, rewind, str(c["models"]), f"{c['acc']:.2f}"]
        cells += [_num(c["se"], 2), paper, diff, c["source"] or "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", _paper_note(cfg, rows)]).rstrip() + "\n"


def _paper_note(cfg: RunConfig, rows: list[dict[str, Any]]) -> str:
    """Why rows have no published value, and how the run's recipe differs from the paper's."""
    from permask.experiment.published import reported, reported_settings
    from permask.experiment.recipes import RECIPES

    ours, name = reported(cfg), _setting_name(cfg)
    if not ours:
        return (
            f"No published number for {name} on {cfg.dataset}; the paper reports "
            f"{reported_settings()} (docs/pipeline.md)."
        )
    notes = [_missing_note(cfg, ours)] if any(math.isnan(c["paper"]) for c in rows) else []
    skip = ("model", "dataset", "sparsity", "rewind", "seeds")
    recipe = {k: v for k, v in RECIPES["paper-cifar"].items() if k not in skip}
    diff = [f"{k} {getattr(cfg, k)} (paper {v})" for k, v in recipe.items() if getattr(cfg, k) != v]
    if diff:
        notes.append(f"This run differs from --recipe paper-cifar in: {', '.join(diff)}.")
    return " ".join(notes)


def _missing_note(cfg: RunConfig, ours: list) -> str:
    """Which sparsities and k the paper reports for ``cfg``'s setting (``ours``: its rows)."""
    from permask.experiment.published import match_epoch

    plain = [r for r in ours if r.match_epoch is None]
    sps = ", ".join(f"{100 * s:g}" for s in sorted({r.sparsity for r in plain} - {None}))
    ks = ", ".join(map(str, sorted({r.rewind for r in plain} - {None})))
    e, when = match_epoch(cfg), ""
    if e is not None:
        early = [f"{100 * r.sparsity:g}% k = {r.rewind}" for r in ours if r.match_epoch == e]
        when = f"; permuted with pi from B at epoch {e}: {', '.join(early) or 'none'}"
    return (
        f"Rows with – have no published number: for {_setting_name(cfg)} on {cfg.dataset} the "
        f"paper reports sparsity {sps}% at k = {ks} (Table 1, at 90%, states no k and stands "
        f"for any k; docs/pipeline.md){when}."
    )


def _setting_name(cfg: RunConfig) -> str:
    return cfg.model if cfg.width == 1 and cfg.model != "resnet20" else f"{cfg.model} x{cfg.width}"


def write_paper(run_dir: Path, cfg: RunConfig, results: Results) -> None:
    """Append (or replace) the "Against the paper" section of ``results.md`` and write
    ``paper.png``; call after :func:`write_report`."""
    path = run_dir / "results.md"
    md = path.read_text().split("\n" + _PAPER_HEAD)[0].rstrip("\n")
    atomic_write_bytes(f"{md}\n\n{paper_markdown(results, cfg)}".encode(), path)
    _plot_paper(paper_comparison(results, cfg), cfg, run_dir / "paper.png")


def _plot_paper(rows: list[dict[str, Any]], cfg: RunConfig, path: Path) -> None:
    """Measured (± SE) beside the paper's value for each row the paper has; when it has none,
    every row's measured value alone."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    matched = [c for c in rows if not math.isnan(c["paper"])]
    shown = matched or rows
    fig = Figure(figsize=(max(4.5, 0.55 * len(shown) + 1.5), 3.8))
    ax = fig.subplots()
    xs = range(len(shown))
    se = [0.0 if math.isnan(c["se"]) else c["se"] for c in shown]
    measured = [c["acc"] for c in shown]
    ax.errorbar([x - 0.12 for x in xs], measured, yerr=se, fmt="o", capsize=3, label="measured")
    if matched:
        ax.plot([x + 0.12 for x in xs], [c["paper"] for c in shown], "D", label="paper")
    ax.set_xticks(list(xs), [_paper_label(c) for c in shown], rotation=45, ha="right")
    title = f"{_setting_name(cfg)} on {cfg.dataset}"
    ax.set(ylabel="test accuracy (%), ± SE", title=title if matched else f"{title} (not in paper)")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)


def _paper_label(c: dict[str, Any]) -> str:
    sparsity = "" if c["sparsity"] is None else f"{100 * c['sparsity']:g}%"
    rewind = "" if c["rewind"] is None else f"k{c['rewind']}"
    return " ".join(s for s in (c["method"], sparsity, rewind) if s)
