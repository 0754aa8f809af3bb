"""Fast subset of the timm coverage sweep: one small model per family, every one equivalent.

The full sweep over timm's zoo is ``benchmarks/timm_coverage.py`` (results: docs/coverage.md).
"""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models.beit import Beit
from timm.models.mlp_mixer import MlpMixer

import permask
from permask.testing import equivalence_error, perturb_

# name -> input side (small where the model accepts img_size)
SUBSET = {
    "vit_tiny_patch16_224": 32,
    "deit_tiny_distilled_patch16_224": 32,
    "swin_tiny_patch4_window7_224": 64,
    "convnext_atto": 32,
    "efficientformer_l1": 224,
    "levit_128": 64,
    "mobilevit_xxs": 64,
    "eva02_tiny_patch14_224": 28,
    "resmlp_12_224": 32,
    "poolformer_s12": 32,
    "coat_lite_tiny": 32,
    "efficientvit_m0": 64,
    "xcit_nano_12_p16_224": 32,
    "gmlp_s16_224": 32,
    "cait_xxs24_224": 32,
    "crossvit_9_240": 240,
    "pit_ti_224": 32,
    "pvt_v2_b0": 32,
    "twins_svt_small": 32,
    "maxvit_nano_rw_256": 64,
    "davit_tiny": 64,
    "edgenext_xx_small": 64,
    "fastvit_t8": 64,
    "repvit_m1": 32,
    "resnet18": 32,
    "resnext26ts": 32,
    "regnetx_002": 32,
    "mobilenetv3_small_050": 32,
    "dla34": 32,
    "dpn68": 32,
    "hrnet_w18_small": 64,
    "inception_v3": 75,
    "mixnet_s": 32,
    "rexnet_100": 32,
    "repvgg_a0": 32,
    "ese_vovnet19b_dw": 64,
    "resnest14d": 32,
    "skresnet18": 32,
    "ecaresnet26t": 32,
    "seresnext26d_32x4d": 32,
    "resnetv2_50x1_bit": 32,
    "starnet_s050": 32,
    "hgnetv2_b0": 32,
    "nf_resnet26": 32,  # NormFreeBlock: a timm leaf without rule, walked inline
    "mambaout_femto": 32,
}
REDUCED = {  # the architecture of mixer_b16_224 / beit_base_patch16_224 at reduced width
    "mixer_b16_224 (reduced)": lambda: MlpMixer(
        img_size=32, num_classes=10, embed_dim=64, num_blocks=2
    ),
    "beit_base_patch16_224 (reduced)": lambda: Beit(
        img_size=32, num_classes=10, embed_dim=64, depth=2, num_heads=4,
        use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1,
    ),
}  # fmt: skip
# fraction of parameters moved below which a model is a known gap (leaf modules without rules)
KNOWN_LOW = {"mobilevit_xxs", "ecaresnet26t", "twins_svt_small", "efficientvit_m0"}


def _build(name: str):
    if name in REDUCED:
        model, side = REDUCED[name](), 32
    else:
        side = SUBSET[name]
        try:
            model = timm.create_model(name, num_classes=10, img_size=side)
        except TypeError:
            model = timm.create_model(name, num_classes=10)
    torch.manual_seed(0)
    model = perturb_(model.double().eval())
    x = torch.randn(
        1, 3, side, side, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    return model, x


@pytest.mark.parametrize("name", [*SUBSET, *REDUCED])
def test_timm_model_is_equivalent_after_random_permutation(name):
    model, x = _build(name)
    graph = permask.trace(model, x)
    pi = permask.random_permutation(graph, torch.Generator().manual_seed(1))
    assert equivalence_error(model, x, pi, graph) <= 1e-5
    if name not in KNOWN_LOW:
        assert graph.permutable_fraction >= 0.9, str(graph)


def test_vit_heads_are_structured_groups():
    model, x = _build("vit_tiny_patch16_224")
    graph = permask.trace(model, x)
    assert graph.permutable_fraction >= 0.95
    q, k, v = graph.tensors["blocks.0.attn.qkv.weight"][0].parts  # fused qkv: three segments
    heads, dim_qk = q.factors
    assert k.factors == (heads, dim_qk) and v.factors[0] == heads  # heads shared by q, k, v
    dim_v = v.factors[1]
    assert (heads.size, dim_qk.size, dim_v.size) == (3, 64, 64) and dim_v != dim_qk
    proj_in = graph.tensors["blocks.0.attn.proj.weight"][1]
    assert proj_in.factors == (heads, dim_v)  # the projection reads heads x v's head_dim
    text = str(graph)
    assert "[(* x g64) | (* x g64) | (* x g64)]" in text  # the heads group
    assert "[(g3 x *) | (g3 x *) | (g3 x g64)]" in text  # q/k's within-head group
    assert "[(g3 x g64) | (g3 x g64) | (g3 x *)]" in text  # v's within-head group


def test_every_timm_name_a_rule_is_attached_to_exists():
    """Rules for timm's classes are attached by name; a rename in timm must fail here (and in
    benchmarks/timm_coverage.py), not only freeze the models that use the class."""
    from permask.graph.rules.timm_layers import MISSING_TIMM_NAMES

    assert MISSING_TIMM_NAMES == []
