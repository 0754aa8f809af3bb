"""Planted permutations in timm families of different layouts are recovered by both methods
(issue 15): grouped convs (RegNetX), depthwise convs with squeeze-excitation (EfficientNet),
inverted bottlenecks (MobileNetV3), a conv/attention hybrid (MobileViT), a gated MLP (gMLP) and
attention heads (ViT, weight matching; its activation matching: tests/test_match_align.py), and
three architectures where weight matching's first sweep used to go wrong (Visformer, CoAtNet,
MobileNet-EdgeTPU: each fails with the code before 20b1e6f), and a token-mixing MLP (MLP-Mixer,
whose activation matching failed before its moved token axis was averaged out).
benchmarks/recovery.py runs the same check over one architecture per timm family."""

from __future__ import annotations

import pytest
import torch

import permask
from permask.match import align
from permask.testing import perturb_

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.outcome

FAMILIES = {  # name -> (create_model keywords, input side)
    "regnetx_002": ({}, 64),
    "efficientnet_b0": ({}, 64),
    "mobilenetv3_small_050": ({}, 64),
    "mobilevit_xxs": ({}, 64),
    "gmlp_ti16_224": ({"img_size": 64}, 64),
    "vit_tiny_patch16_224": ({"img_size": 32, "patch_size": 8}, 32),
    # weight matching used to stop at half the planted objective here: a stage's stream was
    # visited after, or scored against the unsolved hidden groups of, the blocks reading it
    "visformer_tiny": ({"img_size": 64}, 64),
    "coatnet_pico_rw_224": ({"img_size": 64}, 64),
    "mobilenet_edgetpu_100": ({}, 64),
    # token-mixing MLPs: activation matching used to correlate A's hidden tokens with B's
    # differently ordered ones (0-57% of the stream's channels right)
    "mixer_s16_224": ({"img_size": 64}, 64),
}
WEIGHT_ONLY = (
    "vit_tiny_patch16_224",
    "visformer_tiny",
    "coatnet_pico_rw_224",
    "mobilenet_edgetpu_100",
)
# EfficientNet-B0's conv_head has two channels that correlate 0.999995 with each other on this
# data: tied, they are ordered by their weights (a strict xfail until 2026-12-04)
CASES = [
    (name, method)
    for name in FAMILIES
    for method in ("weight", "activation")
    # ViT's activation matching: tests/test_match_align.py; the other three: the sweep
    if not (method == "activation" and name in WEIGHT_ONLY)
]


def _planted(name: str):
    kwargs, side = FAMILIES[name]
    torch.manual_seed(0)
    a = perturb_(timm.create_model(name, num_classes=10, **kwargs).eval())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, side, side, generator=g)
    graph = permask.trace(a, x)
    pi = permask.random_permutation(graph, g)
    b = permask.permute_model(a, pi, graph)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(1e-3 * p.std().nan_to_num() * torch.randn(p.shape, generator=g))
    data = [(torch.randn(8, 3, side, side, generator=g), torch.zeros(8)) for _ in range(4)]
    return a, b, graph, pi, data


@pytest.mark.parametrize(("name", "method"), CASES)
def test_planted_permutation_is_recovered(name, method):
    a, b, graph, pi, data = _planted(name)
    got = align(a, b, data, method=method, graph=graph)
    wrong = [k for k in pi if not torch.equal(got[k], pi[k])]
    assert not wrong, f"{name}/{method}: {len(wrong)} of {len(pi)} groups wrong: {wrong[:3]}"
