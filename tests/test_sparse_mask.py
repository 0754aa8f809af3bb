"""Masks: prunable selection, magnitude pruning (exact counts, ties), sparsity, apply, save/load."""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from permask.sparse import (
    apply_mask,
    load_mask,
    magnitude_mask,
    prunable_parameters,
    save_mask,
    sparsity,
)
from permask.sparse.mask import keep_top


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.shortcut = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8))


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleDict(
        {
            "block": Block(),
            "conv1d": nn.Conv1d(2, 4, 3),
            "fc": nn.Linear(10, 20),
            "out": nn.Linear(20, 5),
        }
    )


def test_default_selection_conv_linear_weights_only():
    names = list(prunable_parameters(make_net()))
    assert names == [
        "block.conv.weight",
        "block.shortcut.0.weight",
        "conv1d.weight",
        "fc.weight",
        "out.weight",
    ]
    assert "block.shortcut.0.weight" not in prunable_parameters(make_net(), dense_shortcuts=True)


def test_include_exclude_globs_and_predicates():
    net = make_net()
    assert list(prunable_parameters(net, include="fc.*")) == ["fc.weight", "fc.bias"]
    assert list(prunable_parameters(net, exclude=["block.*", "conv1d.*"])) == [
        "fc.weight",
        "out.weight",
    ]
    picked = prunable_parameters(net, include=lambda n: n.endswith("bias"), exclude="block.*")
    assert list(picked) == ["conv1d.bias", "fc.bias", "out.bias"]


def test_wrapped_models_use_the_plain_names():
    net = make_net()
    assert list(magnitude_mask(nn.DataParallel(net), 0.5)) == list(magnitude_mask(net, 0.5))


@pytest.mark.parametrize("target", [0.0, 0.3, 0.5, 0.9, 0.99, 1.0])
def test_global_sparsity_is_exact(target):
    net = make_net()
    mask = magnitude_mask(net, target)
    total = sum(m.numel() for m in mask.values())
    kept = sum(int(m.sum()) for m in mask.values())
    assert kept == total - round(target * total)
    s = sparsity(mask)
    overall, per_layer = s  # unpacks as a pair
    assert overall == s.overall == pytest.approx(1 - kept / total)
    assert set(per_layer) == set(mask)


def test_global_keeps_the_largest_magnitudes_across_layers():
    net = make_net()
    mask = magnitude_mask(net, 0.8)
    params = prunable_parameters(net)
    kept = torch.cat([p.detach().abs()[mask[n]] for n, p in params.items()])
    pruned = torch.cat([p.detach().abs()[~mask[n]] for n, p in params.items()])
    assert kept.min() >= pruned.max()
    assert len(set(sparsity(mask).per_layer.values())) > 1  # global: layers differ


def test_layer_scope_prunes_each_tensor_to_the_target():
    net = make_net()
    mask = magnitude_mask(net, 0.75, scope="layer")
    for name, m in mask.items():
        assert int(m.sum()) == m.numel() - round(0.75 * m.numel()), name


def test_with_mask_only_survivors_compete_and_stay_nested():
    net = make_net()
    first = magnitude_mask(net, 0.5)
    with torch.no_grad():
        for n, p in prunable_parameters(net).items():
            p[~first[n]] = 100.0  # pruned but huge: must stay pruned
    second = magnitude_mask(net, 0.8, mask=first)
    assert all(not (second[n] & ~first[n]).any() for n in first)
    assert sparsity(second).overall == pytest.approx(0.8, abs=1e-3)
    with pytest.raises(ValueError, match="keeps only"):
        magnitude_mask(net, 0.2, mask=first)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 3), min_size=1, max_size=40),
    st.lists(st.integers(0, 3), min_size=1, max_size=40),
    st.integers(0, 80),
)
def test_keep_top_exact_count_and_ties_by_position(a, b, keep):
    scores = [torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)]
    keep = min(keep, len(a) + len(b))
    kept = torch.cat([k for k in keep_top(scores, keep)])
    flat = torch.cat(scores)
    assert int(kept.sum()) == keep
    if 0 < keep < flat.numel():
        assert flat[kept].min() >= flat[~kept].max()
        # among equal scores, earlier positions are kept first
        order = sorted(range(flat.numel()), key=lambda i: (-flat[i].item(), i))
        assert kept.nonzero().flatten().tolist() == sorted(order[:keep])


def test_magnitude_mask_is_deterministic_with_ties():
    net = nn.Linear(50, 40)
    with torch.no_grad():
        net.weight.copy_(torch.randint(0, 3, net.weight.shape).float())
    a, b = magnitude_mask(net, 0.5), magnitude_mask(net, 0.5)
    assert torch.equal(a["weight"], b["weight"])


def test_apply_mask_in_place_and_save_load_round_trip(tmp_path):
    net = make_net()
    mask = magnitude_mask(net, 0.6, dense_shortcuts=True)
    apply_mask(net, mask)
    named = dict(net.named_parameters())
    for n, m in mask.items():
        assert torch.count_nonzero(named[n].detach()[~m]) == 0
        assert torch.count_nonzero(named[n].detach()[m]) == int(m.sum())
    save_mask(mask, tmp_path / "m.safetensors")
    loaded = load_mask(tmp_path / "m.safetensors")
    assert set(loaded) == set(mask)
    assert all(loaded[n].dtype == torch.bool and torch.equal(loaded[n], mask[n]) for n in mask)
    shared = torch.tensor([True, False])  # one tensor under two names (e.g. tied weights)
    save_mask({"a": shared, "b": shared}, tmp_path / "s.safetensors")
    assert load_mask(tmp_path / "s.safetensors")["b"].tolist() == [True, False]


def test_load_accepts_uint8_and_rejects_non_masks(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.tensor([0, 1, 1], dtype=torch.uint8)}, str(tmp_path / "u8.safetensors"))
    assert load_mask(tmp_path / "u8.safetensors")["w"].tolist() == [False, True, True]
    save_file({"w": torch.tensor([0.5])}, str(tmp_path / "f.safetensors"))
    with pytest.raises(ValueError, match="not a mask"):
        load_mask(tmp_path / "f.safetensors")


def test_bad_inputs_raise_clear_errors():
    net = make_net()
    mask = magnitude_mask(net, 0.5)
    with pytest.raises(ValueError, match=r"'fc\.weight' has shape \(20, 11\).*\(20, 10\)"):
        apply_mask(net, {"fc.weight": torch.ones(20, 11, dtype=torch.bool)})
    with pytest.raises(KeyError, match="Did you mean 'fc.weight'"):
        apply_mask(net, {"module.fc.weight": mask["fc.weight"]})
    with pytest.raises(TypeError, match="bool tensor"):
        apply_mask(net, {"fc.weight": mask["fc.weight"].int()})
    with pytest.raises(TypeError, match="bool tensor"):
        save_mask({"fc.weight": mask["fc.weight"].int()}, "unused.safetensors")
    with pytest.raises(ValueError, match="sparsity must be a fraction in .0, 1. .0.9 prunes 90%"):
        magnitude_mask(net, 1.5)
    with pytest.raises(ValueError, match="scope"):
        magnitude_mask(net, 0.5, scope="block")
    with pytest.raises(ValueError, match="No prunable parameters"):
        magnitude_mask(nn.BatchNorm1d(3), 0.5)
    with torch.no_grad():
        net["fc"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        magnitude_mask(net, 0.5)


def test_a_tied_weight_is_prunable_under_its_first_name():
    """An LM head tied to the embedding is a Linear weight: it is selected, as 'emb.weight'."""
    lm = nn.Sequential()
    lm.add_module("emb", nn.Embedding(50, 16))
    lm.add_module("mid", nn.Linear(16, 16))
    lm.add_module("head", nn.Linear(16, 50, bias=False))
    lm.head.weight = lm.emb.weight
    assert list(prunable_parameters(lm)) == ["emb.weight", "mid.weight"]


def test_global_pruning_warns_when_it_empties_a_layer():
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with torch.no_grad():
        net[0].weight.mul_(1e-3)  # every weight of the first layer smaller than the second's
    with pytest.warns(UserWarning, match=r"every weight of '0.weight'.*layer collapse"):
        magnitude_mask(net, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        magnitude_mask(net, 0.5, scope="layer")
