"""What importing permask costs and loads (fresh interpreters: the test session has imported
everything already)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *flags, "-c", code]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True, timeout=300)


def test_import_loads_neither_timm_nor_dynamo():
    """timm (and the torch._dynamo it pulls in) cost ~2.7 s: loaded on the first trace only."""
    for module in ("permask", "permask.sparse"):
        lines = _run(f"import {module}", "-X", "importtime").stderr.splitlines()
        loaded = {line.rsplit("|", 1)[-1].strip() for line in lines}
        assert not {m for m in loaded if m.split(".")[0] == "timm" or "_dynamo" in m}, module


def test_a_users_rule_for_a_timm_class_survives_the_first_trace():
    code = """
import torch, timm, permask
from timm.layers import BatchNormAct2d
from permask.graph import Decline

@permask.register_rule(BatchNormAct2d)
def mine(ctx, x):
    raise Decline("the user's rule")

net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), BatchNormAct2d(4), torch.nn.Conv2d(4, 2, 1))
graph = permask.trace(net, torch.randn(1, 3, 8, 8))
print(len(graph.groups), "the user's rule" in str(graph))
"""
    assert _run(code).stdout.split() == ["0", "True"]
