"""Run by tests/test_match_distributed.py under torchrun (gloo, CPU): one process per rank.

Every rank builds the same models and data, streams its own shard (every world-th batch) and
saves what it got; the test compares with one process streaming every batch.
"""

import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

import permask
from permask.experiment.distributed import World
from permask.match.activation import CorrelationStats
from permask.match.points import Plan, Point, Unit
from permask.models import mlp


def models_and_batches():
    """The same on every rank: A, B = a permutation of A plus noise, graph, pi, 5 batches."""
    torch.manual_seed(0)
    a = mlp(32, (48, 48, 48), 10).eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(128, 32, generator=g), torch.zeros(128)) for _ in range(5)]
    graph = permask.trace(a, batches[0][0])
    pi = permask.random_permutation(graph, torch.Generator().manual_seed(3))
    b = permask.permute_model(a, pi, graph)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(1e-3 * p.std() * torch.randn(p.shape, generator=g))
    return a, b, graph, pi, batches


def stats_shards(world: int):
    """Per rank: activations with a rank-specific mean (so the ranks' shifts differ)."""
    g = torch.Generator().manual_seed(5)
    shards = []
    for r in range(world):
        xs = []
        for _ in range(2):
            a = 50 + 3 * r + torch.randn(4, 6, 5, generator=g)
            xs.append((a, 20 - r + 0.5 * a.roll(1, 1) + torch.randn(4, 6, 5, generator=g)))
        shards.append(xs)
    return shards


def point_plan() -> Plan:
    return Plan((Point("x", 1, "x", 6, (Unit(("g",), torch.arange(6)[None]),)),), ())


def _exists_when_rank0_writes(rank: int, size: int, path: Path) -> bool:
    """World.exists where rank 0 writes the file right after asking and rank 1 asks late: both
    must get rank 0's answer (no file), or rank 1 would skip a stage rank 0 runs."""
    world = World(rank, size, rank)
    if rank == 0:
        seen = world.exists(path)
        path.write_text("written")
    else:
        time.sleep(1.0)  # by now rank 0 would have written the file, were it not waiting
        seen = world.exists(path)
    return seen


def main(out: Path) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))  # a stuck test ends
    rank, world = dist.get_rank(), dist.get_world_size()
    a, b, graph, _, batches = models_and_batches()
    shard = batches[rank::world]
    pi, info = permask.align(a, b, shard, graph=graph, distributed=True, return_info=True)
    only_rank0 = permask.align(a, b, batches if rank == 0 else [], graph=graph, distributed=True)
    untraced = None
    try:  # one rank with nothing to trace on: an error on every rank, not a hang
        permask.align(a, b, batches if rank == 0 else [], distributed=True)
    except ValueError as err:
        untraced = str(err)
    stats = CorrelationStats(point_plan(), torch.device("cpu"))
    for xa, xb in stats_shards(world)[rank]:
        stats.observe(0, xa, xb)
    stats.all_reduce()
    exists = _exists_when_rank0_writes(rank, world, out / "written_by_rank0")
    torch.save(
        {"pi": dict(pi), "batches": info.batches, "samples": info.samples,
         "only_rank0": dict(only_rank0), "untraced": untraced,
         "scores": stats.scores()[("g",)], "count": stats.count[0][0], "exists": exists},
        out / f"rank{rank}.pt",
    )  # fmt: skip
    dist.destroy_process_group()
    # the group is freed, so gloo's threads cannot race the interpreter's exit (a rare SIGABRT
    # when something pinned the group: permask imports torch.distributed.nn early for this)
    assert not _gloo_threads(), f"gloo threads outlived destroy_process_group: {_gloo_threads()}"


def _gloo_threads() -> list[str]:
    """Names of this process's gloo threads (Linux names them; elsewhere none are seen)."""
    tasks = Path("/proc/self/task")
    names = [(t / "comm").read_text().strip() for t in tasks.iterdir()] if tasks.is_dir() else []
    return [n for n in names if "gloo" in n]


if __name__ == "__main__":
    main(Path(sys.argv[1]))
