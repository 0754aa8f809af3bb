"""transfer_signs: the source's signs on the target's magnitudes, exactly, inside the mask."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import permask
from permask.sparse import magnitude_mask, transfer_signs


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3))


def test_signs_of_the_source_magnitudes_of_the_target_zero_outside():
    a, b = _mlp(0).state_dict(), _mlp(1).state_dict()
    mask = magnitude_mask(_mlp(0), 0.6)
    out = transfer_signs(a, b, mask)
    assert out.keys() == b.keys()
    for name, keep in mask.items():
        w = out[name]
        assert torch.equal(w[keep].abs(), b[name][keep].abs())  # magnitudes exactly B's
        assert torch.equal(torch.signbit(w[keep]), torch.signbit(a[name][keep]))
        assert torch.equal(w[~keep], torch.zeros_like(w[~keep]))
    for name in b.keys() - mask.keys():  # biases: B's own tensors
        assert out[name] is b[name]


def test_a_zero_source_keeps_the_target_sign_and_inputs_are_not_changed():
    a = {"w": torch.tensor([0.0, -0.0, 2.0])}
    b = {"w": torch.tensor([-3.0, 4.0, -5.0])}
    copy_b = b["w"].clone()
    out = transfer_signs(a, b, {"w": torch.tensor([True, True, True])})
    assert out["w"].tolist() == [-3.0, 4.0, 5.0]
    assert torch.equal(b["w"], copy_b)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), density=st.floats(0.05, 0.95))
def test_with_a_permutation_it_equals_permuting_first(seed, density):
    """transfer_signs(pi(A), pi(B), pi(m)) == pi(transfer_signs(A, B, m)), exactly."""
    model = _mlp(seed)
    graph = permask.trace(model, (torch.randn(2, 6),))
    pi = permask.random_permutation(graph, torch.Generator().manual_seed(seed))
    a, b = model.state_dict(), _mlp(seed + 1).state_dict()
    mask = magnitude_mask(model, 1 - density)
    moved = permask.transfer_signs(
        permask.permute_tensors(a, pi, graph),
        permask.permute_tensors(b, pi, graph),
        permask.permute_mask(mask, pi, graph),
    )
    after = permask.permute_tensors(transfer_signs(a, b, mask), pi, graph)
    assert moved.keys() == after.keys()
    for name in moved:
        assert torch.equal(moved[name], after[name]), name


def test_errors_name_the_entry():
    a, b = {"w": torch.ones(3)}, {"w": torch.ones(3)}
    with pytest.raises(KeyError, match="'v' is not in weights_from"):
        transfer_signs(a, b, {"v": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="'w': shapes differ"):
        transfer_signs(a, {"w": torch.ones(4)}, {"w": torch.ones(3, dtype=torch.bool)})
