"""The run's stages, declared once (permask.experiment.stages): a graph whose order the pipeline
follows, and runners that read only the files of the stages they need, so any order that
respects ``needs`` gives the same run."""

from __future__ import annotations

import networkx as nx
import pytest
from shared_data import TINY_RUN, assert_same_run_files

from permask.experiment import RunConfig, run
from permask.experiment.prepare import prepare
from permask.experiment.runners import RUNNERS
from permask.experiment.stages import stages

VARIANTS = {
    "demo": {},
    "grid": dict(seeds=2, sparsity=[0.5, 0.9], rewind=[0, 2]),
    "shared A, early match": dict(seeds=3, shared_a=True, match_epoch=3, rewind=[1]),
    "every method, sparseopt": dict(
        seeds=2,
        methods=["naive+signs", "lth", "permuted+signs", "permuted", "naive"],
        sparse_precondition="sparseopt",
    ),  # fmt: skip
}


@pytest.mark.parametrize("settings", VARIANTS.values(), ids=VARIANTS.keys())
def test_every_need_comes_earlier_and_every_output_is_one_stages(settings, tmp_path):
    cfg = RunConfig(**settings, out=str(tmp_path))
    run_stages = stages(cfg)
    seen: set[str] = set()
    for stage in run_stages:
        assert set(stage.needs) <= seen, (stage.key, stage.needs)
        seen.add(stage.key)
    assert len(seen) == len(run_stages)  # keys are unique
    outputs = [path for stage in run_stages for path in stage.outputs]
    assert len(set(outputs)) == len(outputs)
    assert all(path.is_relative_to(tmp_path) for path in outputs)
    sparse = [s for s in run_stages if s.kind == "sparse"]
    assert len(sparse) == cfg.seeds * len(cfg.sparsity) * len(cfg.rewind) * len(cfg.methods)


def test_methods_run_in_one_order_and_need_what_they_read(tmp_path):
    cfg = RunConfig(**VARIANTS["every method, sparseopt"], out=str(tmp_path))
    assert cfg.methods == ["lth", "permuted", "naive", "naive+signs", "permuted+signs"]
    needs = {s.method: s.needs for s in stages(cfg) if s.kind == "sparse" and s.seed == 1}
    a, b, imp, pi = "seed1/dense A", "seed1/dense B", "seed1/IMP", "seed1/align"
    moved = "seed1/permuted masks"
    assert needs == {
        "lth": (a, imp),
        "permuted": (b, imp, pi, moved),
        "naive": (b, imp),
        "naive+signs": (a, b, imp),
        "permuted+signs": (a, b, imp, pi, moved),
    }
    only_naive = RunConfig(methods=["naive", "lth"], out=str(tmp_path))
    assert not [s for s in stages(only_naive) if s.kind == "permuted masks"]  # nobody needs it
    sparse = [s for s in stages(cfg) if s.kind == "sparse"]
    assert all(s.precondition == "sparseopt" and s.name.endswith(" sparseopt") for s in sparse)
    assert all(s.directory.name.endswith("_sparseopt") for s in sparse)


def test_shared_a_trains_a_once_and_every_seed_reads_it(tmp_path):
    cfg = RunConfig(**VARIANTS["shared A, early match"], out=str(tmp_path))
    run_stages = stages(cfg)
    assert [s.key for s in run_stages if s.kind in ("imp", "dense") and s.role != "B"] == [
        "seed0/dense A",
        "seed0/IMP",
    ]
    lth = [s for s in run_stages if s.method == "lth"]
    assert {s.needs for s in lth} == {("seed0/dense A", "seed0/IMP")}
    assert all(3 in s.keep for s in run_stages if s.role == "B")  # match_epoch's checkpoint


def test_a_different_order_that_respects_needs_gives_the_same_run(tmp_path, mnist_dir):
    """Dense B before dense A, naive before LTH: the files are the pipeline's, bit for bit."""
    settings = {**TINY_RUN, "data_dir": str(mnist_dir), "seeds": 1, "interp_points": 3}
    ref = run(RunConfig(**settings, out=str(tmp_path / "ref")))
    cfg = RunConfig(**settings, out=str(tmp_path / "other"))
    exp = prepare(cfg)
    run_stages = {s.key: s for s in stages(cfg)}
    graph = nx.DiGraph([(need, s.key) for s in run_stages.values() for need in s.needs])
    graph.add_nodes_from(run_stages)
    order = list(
        nx.lexicographical_topological_sort(graph, key=lambda k: -list(run_stages).index(k))
    )
    assert order != list(run_stages)
    for key in order:
        RUNNERS[run_stages[key].kind](exp, run_stages[key])
    assert_same_run_files(tmp_path / "other", tmp_path / "ref", run_stages.values())
    assert ref.rows  # the reference run finished its report
