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
from permask.experiment.models import mlp, resnet20, vgg11

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
    assert graph.permutable_fraction() >= 0.95, str(graph)
    assert len(graph) > 0


@pytest.mark.parametrize("name", ["resnet20x1", "vgg11_bn", "timm:convnext_atto", "tv:densenet121"])
def test_negative_control_wrong_permutation_changes_outputs(name):
    model, x, graph = traced(name)
    pi = permask.random_permutation(graph, torch.Generator().manual_seed(0))
    broken = break_one_member(model, pi, graph)
    assert rel_err(outputs(model, x), outputs(broken, x)) > 1e-3


def test_resnet20_residual_stream_is_one_group_per_stage():
    """Each stage's residual stream (stem/shortcut outputs, block outputs, BN stats) is shared."""
    _, _, graph = traced("resnet20x1")
    by_size: dict[int, int] = {}
    for g in graph:
        by_size[g.size] = by_size.get(g.size, 0) + 1
    # 3 streams + 9 inner block channels (one per BasicBlock)
    assert len(graph) == 12
    stream = next(g for g in graph if "conv1.weight" in g.tensors[0] or g.size == 16)
    assert any("running_mean" in t for t in stream.tensors)
