"""SparseOpt in MaskedOptimizer: the formula, the identity at equal sparsity, exact zeros."""

import pytest
import torch
from torch import nn

from permask.sparse import MaskedOptimizer, magnitude_mask, sparseopt_factors


def test_the_update_equals_the_formula_on_a_hand_computed_case():
    """Plain SGD, neuron sparsities s = (0, 2/3): s_avg = 1/3, factors sqrt(1 / (2/3)) and
    sqrt((1/3) / (2/3)); theta <- theta - lr * factor_i * g."""
    layer = nn.Linear(3, 2, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    mask = {"weight": torch.tensor([[True, True, True], [True, False, False]])}
    opt = MaskedOptimizer(torch.optim.SGD(layer.parameters(), lr=0.1), mask, layer,
                          precondition="sparseopt")  # fmt: skip
    start = layer.weight.detach().clone() * mask["weight"]
    x = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    layer(x).sum().backward()
    g = layer.weight.grad.detach().clone() * mask["weight"]
    opt.step()
    factor = torch.tensor([[(1 / (2 / 3)) ** 0.5], [((1 / 3) / (2 / 3)) ** 0.5]], dtype=g.dtype)
    expected = start - 0.1 * factor * g
    torch.testing.assert_close(layer.weight.detach(), expected, rtol=1e-15, atol=1e-15)
    assert layer.weight[0, 1] != start[0, 1]  # the step happened
    assert layer.weight[1, 1] == 0 and layer.weight[1, 2] == 0


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 3 * 3, 8), nn.ReLU(), nn.Linear(8, 3))  # fmt: skip


def _train(optimizer: str, mask, precondition, steps: int = 6) -> nn.Module:
    model = _model()
    make = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4),
        "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.01),
    }[optimizer]
    opt = MaskedOptimizer(make(model.parameters()), mask, model, precondition=precondition)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 2, 5, 5, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def _row_mask(model: nn.Module, kept_per_row: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Keep the first ``kept_per_row[name][i]`` entries of each output neuron i."""
    mask = {}
    for name, kept in kept_per_row.items():
        w = model.get_parameter(name)
        flat = torch.zeros(w.shape[0], w[0].numel(), dtype=torch.bool)
        for i, k in enumerate(kept):
            flat[i, :k] = True
        mask[name] = flat.reshape(w.shape)
    return mask


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_equal_sparsity_in_every_neuron_is_the_plain_optimizer_bit_for_bit(optimizer):
    model = _model()
    mask = _row_mask(model, {"0.weight": [9] * 4, "4.weight": [12] * 8, "6.weight": [3] * 3})
    plain = _train(optimizer, mask, None)
    pre = _train(optimizer, mask, "sparseopt")
    for (name, p), q in zip(plain.named_parameters(), pre.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_pruned_entries_stay_exactly_zero_and_the_steps_differ(optimizer):
    model = _model()
    mask = magnitude_mask(model, 0.7)  # unequal sparsity per neuron
    plain = _train(optimizer, mask, None)
    pre = _train(optimizer, mask, "sparseopt")
    for name, keep in mask.items():
        w = pre.get_parameter(name)
        assert torch.equal(w[~keep], torch.zeros_like(w[~keep])), name
    assert not torch.equal(plain.get_parameter("4.weight"), pre.get_parameter("4.weight"))


def test_adamw_steps_scale_per_neuron():
    """Adam normalizes its step, so the preconditioner must act on the step, not the grad: after
    one AdamW step (no decay) each kept weight moved by lr * factor_i (up to eps)."""
    layer = nn.Linear(4, 2, bias=False)
    mask = {"weight": torch.tensor([[True] * 4, [True, False, False, False]])}
    opt = MaskedOptimizer(torch.optim.AdamW(layer.parameters(), lr=0.01, weight_decay=0.0),
                          mask, layer, precondition="sparseopt")  # fmt: skip
    start = layer.weight.detach().clone() * mask["weight"]
    layer(torch.randn(5, 4)).square().sum().backward()
    opt.step()
    moved = (layer.weight.detach() - start).abs()
    factors = sparseopt_factors(mask)["weight"].float()
    torch.testing.assert_close(moved[0], 0.01 * factors[0].expand(4), rtol=1e-4, atol=0)
    torch.testing.assert_close(moved[1, :1], 0.01 * factors[1], rtol=1e-4, atol=0)


def test_factors_and_bad_name():
    mask = {"w": torch.tensor([[True, True], [False, False]]), "b": torch.tensor([True, False])}
    f = sparseopt_factors(mask)
    assert f.keys() == {"w"}  # 1-D entries: factor 1
    assert f["w"].flatten().tolist() == [2**0.5, 0.0]
    assert sparseopt_factors({"w": torch.zeros(2, 2, dtype=torch.bool)})["w"].sum() == 0
    layer = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="precondition must be None or one of sparseopt"):
        MaskedOptimizer(torch.optim.SGD(layer.parameters(), lr=0.1),
                        {"weight": torch.ones(2, 2, dtype=torch.bool)}, layer,
                        precondition="sparse_opt")  # fmt: skip
