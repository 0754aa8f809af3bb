"""``permask report RUN_DIR --paper``: the paper's published numbers (permask/experiment/
published.py) and a finished run's comparison with them, on a tiny run of synthetic digits."""

from __future__ import annotations

import dataclasses
import math
import shutil

import pytest

from permask.cli import main
from permask.experiment import RunConfig, run
from permask.experiment.published import PUBLISHED, published
from permask.experiment.report import Results, paper_markdown, write_paper

_TINY = dict(model="mlp", dataset="mnist", train_subset=1000, test_subset=300, epochs=2, seeds=2,
             sparsity=[0.8], rewind=[0], interp_points=3, threads=1, progress=False,
             device="cpu")  # fmt: skip


def _resnet(width: int, dataset: str = "cifar10", **kw) -> RunConfig:
    return RunConfig(model="resnet20", width=width, dataset=dataset, epochs=200, **kw)


def test_published_numbers_by_key():
    x4, x1 = _resnet(4), _resnet(1)
    row = published(x4, "permuted", 0.97, 75)
    assert (row.acc, row.source) == (94.32, "Adnan et al., ICML 2025, rewinding table, "
                                     "ResNet20x4 CIFAR-10")  # fmt: skip
    assert published(x4, "naive", 0.8, 0).acc == 94.36
    assert published(x4, "dense", None, None).acc == 95.95
    assert published(x1, "lth", 0.9, 20).acc == 91.18  # the k=20 table wins over Table 1
    t1 = published(x1, "lth", 0.9, 5)  # no k=5 table: Table 1 (k not stated) stands for any k
    assert (t1.acc, t1.acc_std, t1.ensemble_acc, t1.js) == (91.15, 0.16, 91.43, 0.011)
    assert "Table 1" in t1.source and published(x1, "dense", None, None).acc == 92.76
    c100 = published(_resnet(4, "cifar100"), "imp", 0.9, None)
    assert (c100.acc, c100.acc_std, c100.kl) == (74.46, None, 1.005)
    assert published(x4, "permuted", 0.9, 5) is None  # Table 1 has no x4 CIFAR-10 rows
    assert published(x1, "lth", 0.5, 20) is None and published(x1, "imp", 0.8, None) is None
    assert published(RunConfig(), "dense", None, None) is None  # the MLP: not in the paper
    assert len(PUBLISHED) == 10 + 1 + 4 * 4 * 3 + 4 * 3 + 1


def test_early_matching_changes_only_the_permuted_row():
    early, final = _resnet(1, match_epoch=5), _resnet(1, match_epoch=200)
    assert published(early, "permuted", 0.97, 20).acc == 85.77
    assert published(early, "lth", 0.97, 20).acc == 89.21  # LTH, naive: no pi involved
    assert published(final, "permuted", 0.97, 20).acc == 86.12  # match_epoch = epochs: final B
    assert published(early, "permuted", 0.9, 20) is None


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, mnist_dir):
    cfg = RunConfig(**_TINY, data_dir=str(mnist_dir), out=str(tmp_path_factory.mktemp("r") / "t"))
    return cfg, run(cfg)


def test_report_paper_rewrites_the_results_with_the_comparison(tiny_run, mnist_dir, capsys):
    cfg, results = tiny_run
    out = cfg.run_dir
    (out / "results.csv").unlink()
    for _ in range(2):  # a second report replaces the section instead of adding another
        assert main(["report", str(out), "--paper", "--data-dir", str(mnist_dir)]) == 0
    printed = capsys.readouterr().out
    md = (out / "results.md").read_text()
    assert md.count("## Against the paper") == 1 and "| permuted | 80% | 0 | 2 |" in md
    note = ("No published number for mlp on mnist; the paper reports resnet20 x1 on cifar10, "
            "resnet20 x4 on cifar10, resnet20 x4 on cifar100 (docs/pipeline.md).")  # fmt: skip
    assert note in md and note in printed and "| dense |  |  | 2 |" in printed
    assert (out / "results.csv").read_text().count("\n") == 6
    assert (out / "paper.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["report", str(out), "--data-dir", str(mnist_dir)]) == 0
    assert "Against the paper" not in (out / "results.md").read_text()


def test_a_setting_of_the_paper_shows_its_numbers_and_differences(tiny_run, tmp_path):
    cfg, results = tiny_run
    paper = dataclasses.replace(cfg, model="resnet20", dataset="cifar10", width=1)
    md = paper_markdown(results, paper)  # dense matches Table 1; 80% at k=0: no number
    dense = results.row("dense")
    se = dense["acc_std"] / math.sqrt(2)
    cells = (
        f"| {dense['acc_mean']:.2f} | {se:.2f} | 92.76 ± 0.11 | {dense['acc_mean'] - 92.76:+.2f} |"
    )
    assert cells in md and "Table 1, ResNet20x1 CIFAR-10 |" in md
    assert "the paper reports sparsity 80, 90, 95, 97% at k = 20" in md
    assert "differs from --recipe paper-cifar in: epochs 2 (paper 200)" in md
    early = paper_markdown(results, dataclasses.replace(paper, epochs=200, match_epoch=5))
    assert "; permuted with pi from B at epoch 5: 97% k = 20." in early
    relabel = {"sparsity": 0.9, "rewind": 20}  # the tiny run's rows as 90% at k=20
    at90 = Results([{**r, **{k: v for k, v in relabel.items() if r[k] is not None}}
                    for r in results.rows])  # fmt: skip
    k20 = dataclasses.replace(paper, epochs=200, sparsity=[0.9], rewind=[20])
    md = paper_markdown(at90, k20)
    lth = at90.row("lth", 0.9, 20)
    assert f"| {lth['acc_mean']:.2f} | {lth['acc_std'] / math.sqrt(2):.2f} | 91.18 | " in md
    assert "| 91.09 ± 0.04 |" in md and "k=20 table, ResNet20x1 CIFAR-10" in md
    assert "Rows with –" not in md  # every row has a published number
    shutil.copy(cfg.run_dir / "results.md", tmp_path / "results.md")
    write_paper(tmp_path, k20, at90)
    assert "91.18" in (tmp_path / "results.md").read_text() and (tmp_path / "paper.png").is_file()


def test_report_of_an_unfinished_run_says_how_to_resume(tiny_run, mnist_dir, tmp_path, capsys):
    cfg, _ = tiny_run
    assert main(["report", str(tmp_path), "--data-dir", str(mnist_dir)]) == 2
    assert f"error: {tmp_path} has no config.yaml" in capsys.readouterr().err
    shutil.copy(cfg.run_dir / "config.yaml", tmp_path / "config.yaml")
    assert main(["report", str(tmp_path), "--paper", "--data-dir", str(mnist_dir)]) == 2
    err = capsys.readouterr().err.strip()
    resume = f"`permask run --config {tmp_path / 'config.yaml'} --out {tmp_path}`"
    assert err == (f"permask report: error: run {tmp_path} is not finished: seed0/dense_b/eval.pt "
                   f"is missing; {resume} (the same config) resumes it")  # fmt: skip
    assert not (tmp_path / "results.md").exists()
