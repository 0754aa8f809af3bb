"""A tiny Stable-Diffusion-style UNet (diffusers ``UNet2DConditionModel``: GroupNorm, cross
attention, timestep embedding, skip connections; from a config, float64, no downloads):
permuted exactly, a planted permutation recovered by weight matching, and the command line on
``diffusers:`` folders."""

from __future__ import annotations

import warnings

import pytest
import torch

import permask
from permask.cli import main
from permask.hub import example_input

diffusers = pytest.importorskip("diffusers")

CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
    attention_head_dim=4, norm_num_groups=4,
)  # fmt: skip


def _unet(seed: int):
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(**CONFIG).double().eval()


def _out(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample


def _changed(a, b) -> int:
    """How many of the state dict's tensors differ."""
    sb = b.state_dict()
    return sum(not torch.equal(v, sb[k]) for k, v in a.state_dict().items())


@pytest.fixture(scope="module")
def traced():
    model = _unet(0)
    inputs = example_input(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = permask.trace(model, inputs)
    return model, inputs, graph


def test_random_permutations_keep_the_unets_function(traced):
    model, inputs, graph = traced
    assert len(graph) > 50  # channels, GroupNorm blocks x within, heads, the MLPs
    assert graph.permutable_fraction >= 0.98  # docs/cli.md
    y = _out(model, inputs)
    for seed in range(3):
        pi = permask.random_permutation(graph, torch.Generator().manual_seed(seed))
        moved = permask.permute_model(model, pi, graph)
        assert float((_out(moved, inputs) - y).abs().max() / y.abs().max()) < 1e-12
        assert _changed(model, moved) > 50


def test_weight_matching_recovers_a_planted_permutation(traced):
    model, _, graph = traced
    pi = permask.random_permutation(graph, torch.Generator().manual_seed(7))
    moved = permask.permute_model(model, pi, graph)
    found = permask.align(model, moved, method="weight", graph=graph)
    assert all(torch.equal(found[g], pi[g]) for g in pi)


def test_align_and_merge_diffusers_folders(tmp_path, capsys):
    a, b = tmp_path / "unet-a", tmp_path / "unet-b"
    _unet(1).save_pretrained(a)
    _unet(2).save_pretrained(b)
    moved, merged = tmp_path / "unet-a-aligned", tmp_path / "unet-merged"
    argv = ["align", f"diffusers:{a}", f"diffusers:{b}", "--method", "weight",
            "--out", str(tmp_path / "pi.safetensors"), "--save-permuted", str(moved)]  # fmt: skip
    assert main(argv) == 0
    load = diffusers.UNet2DConditionModel.from_pretrained
    original = load(a, torch_dtype=torch.float64).eval()
    aligned = load(moved, torch_dtype=torch.float64).eval()
    inputs = example_input(original)
    y = _out(original, inputs)
    assert float((_out(aligned, inputs) - y).abs().max() / y.abs().max()) < 1e-12
    assert _changed(original, aligned) > 50
    assert (moved / "config.json").read_bytes() == (a / "config.json").read_bytes()
    assert main(["merge", f"diffusers:{a}", f"diffusers:{b}", "--method", "weight",
                 "--out", str(merged)]) == 0  # fmt: skip
    assert "not evaluated" in capsys.readouterr().out
    assert torch.isfinite(_out(load(merged, torch_dtype=torch.float64), inputs)).all()
