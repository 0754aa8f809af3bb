"""``permask.align`` under torch.distributed: two real processes (torchrun, gloo on CPU), each
streaming its own shard, get the permutation and statistics of one process streaming all."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from dist_worker import models_and_batches, point_plan, stats_shards

import permask
from permask.match.activation import CorrelationStats

ROOT = Path(__file__).resolve().parents[1]


def test_two_ranks_match_one_process(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests" / "dist_worker.py"), str(tmp_path)]  # fmt: skip
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}  # a crash prints where each rank was
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: torchrun stops its workers too
        _, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    a, b, graph, _, batches = models_and_batches()
    want, info = permask.align(a, b, batches, graph=graph, return_info=True)
    x = torch.cat([x for x, _ in batches])  # pi(A) computes B (up to B's noise; some units
    with torch.no_grad():  # are dead, and any order of those is as good)
        torch.testing.assert_close(
            permask.permute_model(a, want, graph)(x), b(x), atol=2e-2, rtol=0
        )
    assert [r["exists"] for r in ranks] == [False, False]  # rank 0's answer, on both ranks
    for got in ranks:
        assert permask.Permutation(got["pi"]) == want
        assert permask.Permutation(got["only_rank0"]) == want  # one rank had every batch
        assert "a rank's loader yielded no batches; pass graph=" in got["untraced"]
        assert (got["batches"], got["samples"]) == (info.batches, info.samples) == (5, 640)

    stats = CorrelationStats(point_plan(), torch.device("cpu"))
    for shard in stats_shards(2):
        for xa, xb in shard:
            stats.observe(0, xa, xb)
    for got in ranks:
        assert got["count"] == stats.count[0][0]
        # equal up to the float32 products, formed after different shifts (ranks: their own)
        torch.testing.assert_close(got["scores"], stats.scores()[("g",)], atol=1e-6, rtol=0)
