"""Round trips with torch.nn.utils.prune and torch.nn.utils.parametrize layouts."""

import copy

import pytest
import torch
from torch import nn
from torch.ao.pruning.sparsifier.utils import FakeSparsity
from torch.nn.utils import parametrize, prune

from permask.sparse import (
    from_parametrize,
    from_torch_prune,
    magnitude_mask,
    to_parametrize,
    to_torch_prune,
)


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))


def masked_weights(net: nn.Module, mask: dict) -> dict:
    named = dict(net.named_parameters())
    return {n: named[n].detach() * m for n, m in mask.items()}


def test_torch_prune_round_trip():
    net = make_net()
    mask = magnitude_mask(net, 0.6)
    expected = masked_weights(net, mask)
    to_torch_prune(net, mask)
    assert {n for n, _ in net.named_parameters()} >= {"0.weight_orig", "3.weight_orig"}
    x = torch.randn(2, 3, 6, 6)
    out = net(x)
    back = from_torch_prune(net)
    assert set(back) == set(mask) and all(torch.equal(back[n], mask[n]) for n in mask)
    assert not any(n.endswith("_orig") for n, _ in net.named_parameters())
    named = dict(net.named_parameters())
    assert all(torch.equal(named[n].detach(), expected[n]) for n in mask)
    assert torch.allclose(net(x), out)


def test_from_torch_prune_reads_the_users_own_pruning_and_can_keep_it():
    net = make_net()
    prune.global_unstructured(
        [(net[0], "weight"), (net[3], "weight")], prune.L1Unstructured, amount=0.5
    )
    prune.l1_unstructured(net[3], "weight", amount=0.2)  # stacked: a PruningContainer
    mask = from_torch_prune(net, remove=False)
    assert torch.equal(mask["3.weight"], net[3].weight_mask.bool())
    assert hasattr(net[3], "weight_orig")  # reparametrization kept
    assert sum(int(m.sum()) for m in mask.values()) < 0.5 * sum(m.numel() for m in mask.values())


def test_parametrize_round_trip():
    net = make_net()
    mask = magnitude_mask(net, 0.7, scope="layer")
    expected = masked_weights(net, mask)
    to_parametrize(net, mask)
    assert parametrize.is_parametrized(net[0], "weight")
    assert torch.equal(net[0].weight, expected["0.weight"])
    back = from_parametrize(net)
    assert all(torch.equal(back[n], mask[n]) for n in mask)
    assert not parametrize.is_parametrized(net[0])
    named = dict(net.named_parameters())
    assert all(torch.equal(named[n].detach(), expected[n]) for n in mask)


def test_from_parametrize_reads_torch_ao_fake_sparsity():
    net = make_net()
    m = torch.rand(net[3].weight.shape) > 0.5
    parametrize.register_parametrization(net[3], "weight", FakeSparsity(m.float()))
    plain = copy.deepcopy(net)
    mask = from_parametrize(plain)
    assert list(mask) == ["3.weight"] and torch.equal(mask["3.weight"], m)
    assert torch.count_nonzero(plain[3].weight.detach()[~m]) == 0


def test_conversion_errors():
    net = make_net()
    with pytest.raises(KeyError, match="no submodule 'fc'"):
        to_torch_prune(net, {"fc.weight": torch.ones(5, 64, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"'3\.weight' has shape \(64, 5\)"):
        to_parametrize(net, {"3.weight": torch.ones(64, 5, dtype=torch.bool)})


def test_from_parametrize_refuses_to_drop_other_parametrizations():
    """torch removes a tensor's parametrizations together: with a weight norm beside the mask,
    remove=True is refused before anything changes; remove=False reads the mask."""
    net = make_net()
    mask = magnitude_mask(net, 0.6)
    net[3] = nn.utils.parametrizations.weight_norm(net[3])
    to_parametrize(net, mask)
    with pytest.raises(
        ValueError, match=r"'3.weight' also has the parametrization\(s\) _WeightNorm"
    ):
        from_parametrize(net)
    assert parametrize.is_parametrized(net[3]) and parametrize.is_parametrized(net[0])
    back = from_parametrize(net, remove=False)
    assert all(torch.equal(back[n], mask[n]) for n in mask)
