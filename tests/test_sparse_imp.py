"""IMP: exact target sparsities (one or several per run), nested masks, rewinding, determinism."""

import copy

import pytest
import torch
from torch import nn

from permask.sparse import (
    MaskedOptimizer,
    imp,
    imp_schedule,
    imp_sparsities,
    magnitude_mask,
    sparsity,
)


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 16),
        nn.ReLU(),
        nn.Linear(16, 3),
    )


def trainer(log: list | None = None, steps: int = 3):
    """A seeded train_fn: fresh MaskedOptimizer each round, fixed data."""

    def train_fn(model: nn.Module, mask: dict, round: int) -> None:
        start = copy.deepcopy(model.state_dict())
        g = torch.Generator().manual_seed(round)
        opt = MaskedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), mask, model
        )
        for _ in range(steps):
            x, y = torch.randn(16, 1, 6, 6, generator=g), torch.randn(16, 3, generator=g)
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
        if log is not None:
            log.append((round, start, copy.deepcopy(model.state_dict())))

    return train_fn


def test_schedule_by_integer_counts_lands_on_target():
    counts = imp_schedule(1000, 0.9)
    assert counts == [800, 640, 512, 410, 328, 262, 210, 168, 134, 107, 100]
    assert len(imp_schedule(272474, 0.9)) == 11
    assert imp_schedule(4, 0.5) == [3, 2]  # at least one weight per round, clipped to the target
    assert imp_schedule(100, 0.0) == []
    # 1 - 0.8^2: per-round rounding leaves one weight over; that is no third round
    assert imp_schedule(6082, 0.36) == [4866, 3892]
    assert 6082 - round(0.36 * 6082) == 3892
    with pytest.raises(ValueError, match="rate"):
        imp_schedule(100, 0.5, rate=1.0)


@pytest.mark.parametrize("target", [0.5, 0.9, 0.973])
def test_imp_fine_tuning_reaches_target_exactly(target):
    net = make_net()
    result = imp(net, trainer(), target)
    total = sum(m.numel() for m in result.masks[-1].values())
    zeros = total - sum(int(m.sum()) for m in result.masks[-1].values())
    assert zeros == round(target * total)
    assert result.sparsities[-1] == zeros / total
    assert len(result.masks) == len(imp_schedule(total, target))
    for earlier, later in zip(result.masks, result.masks[1:]):  # nested: pruned stays pruned
        assert all(not (later[n] & ~earlier[n]).any() for n in later)
    named = dict(net.named_parameters())
    assert all(torch.count_nonzero(named[n].detach()[~m]) == 0 for n, m in result.masks[-1].items())


def test_imp_layer_scope_and_dense_shortcuts():
    class WithShortcut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3, padding=1)
            self.shortcut = nn.Conv2d(2, 4, 1)

        def forward(self, x):
            return self.conv(x) + self.shortcut(x)

    torch.manual_seed(0)
    net = WithShortcut()
    result = imp(net, lambda m, mask, r: None, 0.8, scope="layer", dense_shortcuts=True)
    assert list(result.masks[-1]) == ["conv.weight"]
    assert sparsity(result.masks[-1]).per_layer["conv.weight"] == round(0.8 * 72) / 72


def test_imp_is_deterministic():
    a, b = make_net(), make_net()
    ra, rb = imp(a, trainer(), 0.8), imp(b, trainer(), 0.8)
    assert all(torch.equal(x[n], y[n]) for x, y in zip(ra.masks, rb.masks) for n in x)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_imp_rewinding_resets_survivors_to_the_rewind_point():
    net = make_net()
    rewind = copy.deepcopy(net.state_dict())  # "k = 0": the initialization
    trainer()(net, {}, 0)  # dense training of A before IMP
    log = []
    result = imp(net, trainer(log), 0.6, rewind_state=rewind)
    for (round, start, _), mask in zip(log, result.masks):
        for name, value in start.items():
            want = rewind[name] * mask[name] if name in mask else rewind[name]
            assert torch.equal(value, want), (round, name)
    # the first mask is the magnitude mask of the dense-trained weights, not of the init
    trained = make_net()
    trainer()(trained, {}, 0)
    assert all(torch.equal(result.masks[0][n], m) for n, m in magnitude_mask(trained, 0.2).items())


def test_imp_fine_tuning_starts_each_round_from_the_trained_weights():
    net = make_net()
    log = []
    result = imp(net, trainer(log), 0.5)
    assert len(log) == len(result.masks) == 4  # 0.8**3 > 0.5
    for (_, _, end), (_, start, _), mask in zip(log, log[1:], result.masks[1:]):
        for name, value in start.items():
            want = end[name] * mask[name] if name in mask else end[name]
            assert torch.equal(value, want), name


def test_imp_layer_scope_every_tensor_on_its_own_exact_target():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 2), nn.Linear(2, 50), nn.Linear(50, 7))  # 2, 100, 350
    result = imp(net, lambda m, mask, r: None, 0.7, scope="layer")
    for name, m in result.masks[-1].items():
        assert int((~m).sum()) == round(0.7 * m.numel()), name
    with pytest.raises(ValueError, match="scope"):
        imp(net, lambda m, mask, r: None, 0.7, scope="net")


def test_a_sparsity_that_prunes_nothing_is_refused():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="prunes no weight of the 16 selected"):
        imp(model, lambda m, mask, r: None, 0.0)


def test_one_run_lands_exactly_on_several_targets_and_reports_them():
    net, seen = make_net(), []
    result = imp(net, trainer(), [0.9, 0.5], on_round=seen.append)
    total = sum(m.numel() for m in result.masks[-1].values())
    assert [r.round for r in seen] == list(range(1, len(result.masks) + 1))
    assert all(r.rounds == len(result.masks) for r in seen)
    assert [(r.round, r.targets) for r in seen if r.targets] == [
        (result.rounds_of[0.5], (0.5,)),
        (result.rounds_of[0.9], (0.9,)),
    ]
    for target in (0.5, 0.9):
        mask = result.mask_at(target)
        assert sum(int((~m).sum()) for m in mask.values()) == round(target * total)
    assert result.masks[-1] is result.mask_at(0.9)
    # round r prunes 20% of what survived, whatever the later targets are
    single = imp(make_net(), trainer(), 0.5)
    assert all(torch.equal(a[n], b[n]) for a, b in zip(single.masks, result.masks) for n in a)
    with pytest.raises(KeyError, match="requested"):
        result.mask_at(0.7)


def test_schedule_of_several_targets_is_the_geometric_one_rounded_per_round():
    total = 272474
    counts = imp_schedule(total, [0.97, 0.9])
    assert counts == [total - round(s * total) for s in imp_sparsities([0.9, 0.97])]
    assert counts[:2] == [total - round(0.2 * total), total - round(0.36 * total)]
    assert imp_schedule(total, 0.9) == counts[: len(imp_schedule(total, 0.9))]
    assert imp_schedule(total, 0.9)[-1] == total - round(0.9 * total)
