"""Headline figures in the README and docs come from benchmarks/results/*.jsonl: a rerun that
changes a result makes this fail until the prose says the same."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (RESULTS / name).read_text().splitlines() if line]


def _latest(rows: list[dict], key: str) -> dict[str, dict]:
    """The last row per ``key`` (a rerun appends)."""
    return {r[key]: r for r in rows}


def test_hugging_face_families_traced():
    families = _latest(_rows("hf_coverage.jsonl"), "family")
    traced = sum(r["traced"] for r in families.values())
    corrupted = [f for f, r in families.items() if r["traced"] and r["change"] > 1e-4]
    assert not corrupted
    readme = (ROOT / "README.md").read_text()
    assert f"({traced} families traced, none corrupted" in readme
    coverage = (ROOT / "docs" / "coverage.md").read_text()
    assert f"resumable): {len(families)} families" in coverage


def test_recovery_table_is_the_results_files():
    rows = _rows("recovery.jsonl")
    models = _latest(rows, "model")
    coverage = (ROOT / "docs" / "coverage.md").read_text()
    assert f"\n{len(models)} architectures. Per method:" in coverage
    for method in ("weight", "activation"):  # a rerun of one method appends rows of it alone
        latest = _latest([r for r in rows if method in r], "model")
        exact = sum(r[method]["exact"] == 1.0 for r in latest.values())
        line = re.search(rf"\n\| {method} \| (\d+) \| \d+ \| (\d+)/(\d+) \|", coverage)
        assert line and line.groups() == (str(len(latest)), str(exact), str(len(models))), method


def test_docstring_examples_run():
    """Every ``>>>`` example in permask's docstrings gives the output it shows."""
    import doctest
    import importlib

    package = ROOT / "permask"
    files = [p for p in sorted(package.rglob("*.py")) if ">>>" in p.read_text()]
    assert len(files) >= 5
    for path in files:
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, f"{name}: {result.failed} docstring example(s) failed"


def hub_memory_rows() -> list[str]:
    """docs/benchmarks.md's table rows of benchmarks/hub_memory.py, from its latest run per size,
    dtype and step."""
    latest = {}
    for row in _rows("hub_memory.jsonl"):
        for step, r in row.items():
            if step.startswith(("weight", "activation")):
                latest[(row["size"], row["dtype"], step)] = r
    return [f"| {size} | {dtype} | {step} | {r['seconds']:.0f} | "
            f"{r['peak_bytes'] / 2**30:.2f} | {r['ratio']:.2f} |"
            for (size, dtype, step), r in latest.items()]  # fmt: skip


def test_hub_memory_table_is_the_results_file():
    benchmarks = (ROOT / "docs" / "benchmarks.md").read_text()
    rows = hub_memory_rows()
    assert rows and all(r in benchmarks for r in rows), rows


def _pairs_rows() -> list[dict]:
    """transformer_pairs.jsonl's 600-step cosine-schedule rows of the benchmark's own shape
    (not those of ``--hidden``, ``--heads``, ``--corpus`` or ``--device`` runs)."""
    shaped = ("heads", "corpus", "device")
    return [
        r
        for r in _rows("transformer_pairs.jsonl")
        if r.get("schedule") == "cosine" and r.get("steps", 600) == 600
        and r.get("hidden", 128) == 128 and r.get("layers", 4) == 4
        and not any(k in r for k in shaped)
    ]  # fmt: skip


def test_transformer_pairs_tables_are_the_results_file():
    """docs/results.md's trained-pair tables show the latest 600-step cosine-schedule row of each
    pair of seeds 1 and 2: every barrier with its ratio to the naive one (STE with the maps, and
    REPAIR after folding alone, are left out)."""
    text = (ROOT / "docs" / "results.md").read_text()
    section = text[text.index("## Trained transformer pairs") :]
    section = section[: section.index("\n## ")]
    latest = _latest([r for r in _pairs_rows() if r.get("seeds", [1, 2]) == [1, 2]], "kind")
    assert set(latest) == {"vit", "gpt2", "llama"}
    for kind, row in latest.items():
        naive = row["naive"]["barrier"]
        assert f"| {naive:.3f} |" in section, kind
        for method, cell in row.items():
            if not isinstance(cell, dict) or method == "naive" or method.startswith("ste+"):
                continue
            shown_keys = ("barrier",) if method.endswith("+fold") else ("barrier", "repair")
            for value in (cell[k] for k in shown_keys):
                shown = (
                    f"{value:.3f} ({value / naive:.2f})",
                    f"{value:.3f} (**{value / naive:.2f}**)",
                )
                assert any(s in section for s in shown), (kind, method, value)


def test_second_pair_of_seeds_table_is_the_results_file():
    """The trained pairs' table of their pairs of seeds shows the latest row of each pair for
    seeds 1, 2, 3, 4 and 5, 6: its naive barrier, and each method's barrier with its ratio, on
    the row of its seeds."""
    text = (ROOT / "docs" / "results.md").read_text()
    section = text[text.index("**Two more pairs of seeds**") :]
    lines = section[: section.index("\n\n", section.index("| pair | seeds |"))].splitlines()
    rows = _pairs_rows()
    names = {"vit": "ViT", "gpt2": "GPT-2", "llama": "Llama"}
    for seeds in ([1, 2], [3, 4], [5, 6]):
        latest = _latest([r for r in rows if r.get("seeds", [1, 2]) == seeds], "kind")
        assert set(latest) == set(names)
        for kind, row in latest.items():
            line = next(x for x in lines if x.startswith(f"| {names[kind]} | {seeds[0]}, "))
            naive = row["naive"]["barrier"]
            assert f"| {naive:.3f} |" in line, (kind, seeds)
            for method in ("weight", "activation", "ste"):
                value = row[method]["barrier"]
                assert f"| {value:.3f} ({value / naive:.2f}) |" in line, (kind, seeds, method)


def test_longer_training_table_is_the_results_file():
    """The table of the language models trained on the whole standard library's source shows
    the latest row of the benchmark's width and depth per kind, seeds and steps: naive barrier,
    weight, activation and STE matching's, and the best with the maps (without REPAIR)."""
    text = (ROOT / "docs" / "results.md").read_text()
    section = text[text.index("| pair, whole standard library | seeds |") :]
    lines = section[: section.index("\n\n")].splitlines()
    names = {"gpt2": "GPT-2", "llama": "Llama"}
    shape = {"corpus": "stdlib", "hidden": 128, "layers": 4}
    rows = {(r["kind"], tuple(r["seeds"]), r["steps"]): r for r in _rows("transformer_pairs.jsonl")
            if all(r.get(k) == v for k, v in shape.items())}  # fmt: skip
    assert {steps for _, _, steps in rows} >= {600, 2400}
    for (kind, seeds, steps), row in rows.items():
        start = f"| {names[kind]} | {', '.join(map(str, seeds))} | {steps:,} |"
        line = next((x for x in lines if x.startswith(start)), None)
        assert line is not None, start
        naive = row["naive"]["barrier"]
        assert f"| {naive:.3f} |" in line
        for method in ("weight", "activation", "ste"):
            value = row[method]["barrier"]
            assert f"| {value:.3f} ({value / naive:.2f}) |" in line, (kind, method)
        best, name = min((v["barrier"], k) for k, v in row.items() if isinstance(v, dict)
                         and "+" in k and not k.endswith("+fold"))  # fmt: skip
        shown = name.replace("+", " + ").replace("ste", "STE")
        assert f"| {best:.3f} ({best / naive:.3f}, {shown}) |" in line, (kind, seeds, steps)


def test_llama_variants_table_is_the_results_file():
    """The table of the Llama's variants shows, for every variant, the latest rows of both
    pairs of seeds: naive barrier, weight matching's ratio, the learned maps' ratio and the
    barrier they leave."""
    text = (ROOT / "docs" / "results.md").read_text()
    section = text[text.index("| variant | changed |") :]
    lines = section[: section.index("\n\n")].splitlines()
    latest = _variants_by_seeds(None)
    assert set(latest[(1, 2)]) == set(latest[(3, 4)])
    for variant, first in latest[(1, 2)].items():
        second = latest[(3, 4)][variant]
        line = next(x for x in lines if x.startswith(f"| `{variant}` |"))
        for one, other in zip(_variant_cells(first), _variant_cells(second)):
            assert f"| {one} / {other} |" in line, (variant, one, other)


def test_llama_variants_on_more_text_table_is_the_results_file():
    """The table of the variants trained on the whole standard library's source shows each
    variant's latest such rows, seeds 1, 2 and (where run) 3, 4: naive barrier, weight matching's
    and the learned maps' ratio, and the barrier the learned maps leave (ratio x naive)."""
    text = (ROOT / "docs" / "results.md").read_text()
    section = text[text.index("| variant | whole standard library") :]
    lines = section[: section.index("\n\n")].splitlines()
    latest = _variants_by_seeds("stdlib")
    assert len(latest[(1, 2)]) >= 4 and set(latest[(3, 4)]) <= set(latest[(1, 2)])
    for variant, first in latest[(1, 2)].items():
        second = latest[(3, 4)].get(variant)
        line = next(x for x in lines if x.startswith(f"| `{variant}` |"))
        for one, other in zip(_variant_cells(first), _variant_cells(second)):
            assert f"| {one} / {other} |" in line, (variant, one, other)
        assert f"| {'yes' if 'rope' in first['sites'] else 'no'} |" in line, variant


def test_llama_variants_ranges_with_and_without_rope_are_the_results_file():
    """The loss the learned maps leave, as docs/results.md sums it up per corpus: the range over
    the variants with RoPE and over those without (latest row per variant and seeds)."""
    text = " ".join((ROOT / "docs" / "results.md").read_text().split())
    rows = _rows("llama_variants.jsonl")
    for corpus in (None, "stdlib"):
        latest = {(r["variant"], tuple(r["seeds"])): r for r in rows if r.get("corpus") == corpus}
        for rope, phrase in ((True, "with RoPE leaves"), (False, "every one without")):
            left = [r["learned"] * r["naive"] for r in latest.values()
                    if ("rope" in r["sites"]) == rope]  # fmt: skip
            shown = f"{phrase} {min(left):.3f}-{max(left):.3f}"
            if corpus == "stdlib":
                shown += f" of loss after the learned maps ({len(left)} pairs)" if rope else (
                    f" ({len(left)} pairs)")  # fmt: skip
            assert shown in text, (corpus, shown)


def _variants_by_seeds(corpus: str | None) -> dict[tuple, dict[str, dict]]:
    """llama_variants.jsonl's latest row per variant on ``corpus`` (None: the four modules), for
    seeds 1, 2 and for seeds 3, 4."""
    rows = [r for r in _rows("llama_variants.jsonl") if r.get("corpus") == corpus]
    return {seeds: _latest([r for r in rows if r["seeds"] == list(seeds)], "variant")
            for seeds in ((1, 2), (3, 4))}  # fmt: skip


def _variant_cells(row: dict | None) -> tuple[str, ...]:
    """A variant row's naive barrier, ratios and the barrier left, as the table prints them."""
    if row is None:
        return ("-",) * 4
    left = row["learned"] * row["naive"]
    return f"{row['naive']:.3f}", f"{row['weight']:.2f}", f"{row['learned']:.3f}", f"{left:.3f}"


def test_beyond_orthogonal_table_is_the_results_file():
    """The table of maps beyond orthogonal shows the latest row of each pair of seeds and
    number of batches: every kind of maps' ratio."""
    text = (ROOT / "docs" / "results.md").read_text()
    section = text[text.index("| learned maps | STE's 60 batches") :]
    lines = section[: section.index("\n\n")].splitlines()
    latest = {(tuple(r["seeds"]), r["steps"]): r for r in _rows("beyond_orthogonal.jsonl")}
    names = {
        "orthogonal": "orthogonal (permask's)",
        "orthogonal+values": "+ value heads' `G`",
        "orthogonal+planes": "+ RoPE planes' scales",
        "orthogonal+units": "+ gated units' scales",
        "orthogonal+values+planes+units": "all three",
    }
    for key, label in names.items():
        line = next(x for x in lines if x.startswith(f"| {label} |"))
        for steps in (60, 300):
            first, second = (latest[(seeds, steps)][key]["ratio"] for seeds in ((1, 2), (3, 4)))
            assert f"| {first:.3f} / {second:.3f} |" in line, (key, steps)
