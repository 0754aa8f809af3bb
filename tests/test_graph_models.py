"""Property tests on real architectures: any random permutation leaves outputs unchanged."""

from __future__ import annotations

import functools

import pytest
import timm
import torch
import torchvision
from equivariance import assert_equivariant, break_one_member, double_eval, outputs, rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import permask
from permask.models import mlp, resnet20, vgg11

MODELS = {
    "mlp": (lambda: mlp(784, (64, 32, 48), 10), (4, 1, 28, 28)),
    "resnet20x1": (lambda: resnet20(width=1), (2, 3, 32, 32)),
    "resnet20x4": (lambda: resnet20(width=4), (2, 3, 32, 32)),
    "vgg11": (lambda: vgg11(batch_norm=False), (2, 3, 32, 32)),
    "vgg11_bn": (lambda: vgg11(batch_norm=True), (2, 3, 32, 32)),
    "tv:resnet18": (lambda: torchvision.models.resnet18(), (2, 3, 32, 32)),
    "tv:resnet50": (lambda: torchvision.models.resnet50(), (2, 3, 32, 32)),
    "tv:mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(), (2, 3, 32, 32)),
    "tv:densenet121": (lambda: torchvision.models.densenet121(), (1, 3, 32, 32)),
    "tv:efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(), (2, 3, 32, 32)),
    "timm:resnet50": (lambda: timm.create_model("resnet50"), (2, 3, 32, 32)),
    "timm:convnext_atto": (lambda: timm.create_model("convnext_atto"), (2, 3, 32, 32)),
    "timm:efficientnet_b0": (lambda: timm.create_model("efficientnet_b0"), (2, 3, 32, 32)),
    "timm:regnety_002": (lambda: timm.create_model("regnety_002"), (2, 3, 32, 32)),
    "timm:cspresnet50": (lambda: timm.create_model("cspresnet50"), (2, 3, 64, 64)),
    "timm:ghostnet_100": (lambda: timm.create_model("ghostnet_100"), (2, 3, 32, 32)),
    "timm:res2net50_14w_8s": (lambda: timm.create_model("res2net50_14w_8s"), (2, 3, 32, 32)),
}


@functools.cache
def traced(name: str):
    build, shape = MODELS[name]
    model = double_eval(build())
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return model, x, permask.trace(model, x)


@pytest.mark.parametrize("name", list(MODELS))
@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**31 - 1))
def test_random_permutation_keeps_outputs(name, seed):
    model, x, graph = traced(name)
    assert_equivariant(model, x, graph, seed, tol=1e-6)


@pytest.mark.parametrize("name", list(MODELS))
def test_nearly_everything_is_permuted(name):
    """Only inputs and logits may be frozen: >= 95% of parameters move."""
    _, _, graph = traced(name)
    assert graph.permutable_fraction >= 0.95, str(graph)
    assert len(graph) > 0


@pytest.mark.parametrize("name", ["resnet20x1", "vgg11_bn", "timm:convnext_atto", "tv:densenet121"])
def test_negative_control_wrong_permutation_changes_outputs(name):
    model, x, graph = traced(name)
    pi = permask.random_permutation(graph, torch.Generator().manual_seed(0))
    broken = break_one_member(model, pi, graph)
    assert rel_err(outputs(model, x), outputs(broken, x)) > 1e-3


def _bn(prefix: str) -> set[str]:
    return {f"{prefix}.{p}:0" for p in ("weight", "bias", "running_mean", "running_var")}


def _resnet20_expected_groups() -> list[set[str]]:
    """ResNet20's groups, from the architecture: per stage one residual stream, per block one."""
    streams, inner = [], []
    for s in (1, 2, 3):
        # the stream starts at the stem (stage 1) or at the first block's conv shortcut
        if s == 1:
            stream = {"conv1.weight:0", *_bn("bn1")}
        else:
            stream = {f"layer{s}.0.shortcut.0.weight:0", *_bn(f"layer{s}.0.shortcut.1")}
        for j in range(3):
            b = f"layer{s}.{j}"
            stream |= {f"{b}.conv2.weight:0", *_bn(f"{b}.bn2")}  # block output, added to stream
            if s == 1 or j > 0:  # identity shortcut: the block reads the stream directly
                stream.add(f"{b}.conv1.weight:1")
            inner.append({f"{b}.conv1.weight:0", *_bn(f"{b}.bn1"), f"{b}.conv2.weight:1"})
        # read by the next stage's first block (conv1 and shortcut conv) or by the head
        stream |= (
            {f"layer{s + 1}.0.conv1.weight:1", f"layer{s + 1}.0.shortcut.0.weight:1"}
            if s < 3
            else {"linear.weight:1"}
        )
        streams.append(stream)
    return streams + inner


def _members(group) -> set[str]:
    return {f"{m.tensor}:{m.axis}" for m in group.members}


def _group_with(graph, member: str):
    (group,) = [g for g in graph if member in _members(g)]
    return group


def test_resnet20_residual_stream_is_one_group_per_stage():
    """Each stage's residual stream (stem/shortcut outputs, block outputs, BN stats) is shared.

    A tracer that merged a stage's stream with its blocks' inner channels (all 16 wide in stage
    1), split the stream at a residual add, or froze it, gives a different partition.
    """
    _, _, graph = traced("resnet20x1")
    expected = _resnet20_expected_groups()
    assert len(graph) == 12  # 3 streams + 9 inner block channels (one per BasicBlock)
    assert sorted(g.size for g in graph) == [16] * 4 + [32] * 4 + [64] * 4
    assert sorted(map(sorted, map(_members, graph))) == sorted(map(sorted, expected))

    # stage 1: the stem's output, all three blocks' outputs and the BN stats of each are one group
    stream = _group_with(graph, "layer1.0.conv2.weight:0")
    assert stream.size == 16
    assert _members(stream) == expected[0]
    assert _group_with(graph, "conv1.weight:0") is stream
    assert _group_with(graph, "layer1.2.bn2.running_mean:0") is stream
    assert _group_with(graph, "layer2.0.shortcut.0.weight:1") is stream
    # ... and distinct from the first block's inner channels, also 16 wide
    inner = _group_with(graph, "layer1.0.conv1.weight:0")
    assert inner is not stream and inner.size == 16
    assert _members(inner) == {
        "layer1.0.conv1.weight:0",
        *_bn("layer1.0.bn1"),
        "layer1.0.conv2.weight:1",
    }
    # stages are separate: stage 2's stream starts at its shortcut conv
    stage2 = _group_with(graph, "layer2.0.shortcut.0.weight:0")
    assert stage2.size == 32 and stage2 is not stream
    assert _members(stage2) == expected[1]
