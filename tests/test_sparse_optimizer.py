"""MaskedOptimizer: exact zeros in weights, grads and state, and the same trajectory as a reference.

The reference is ``torch.nn.utils.prune``: it trains a dense ``weight_orig`` and uses
``weight = weight_orig * mask`` in every forward, so the chain rule masks the gradient by hand.
For the same initial weights, data and optimizer, the effective weight ``weight_orig * mask`` of
the reference must equal our weight after every step (bitwise for elementwise optimizers, whose
pruned entries cannot influence kept ones). Unlike the reference, ours must also hold exact zeros
under the mask in the weight itself, its grad and every same-shape optimizer state tensor.
"""

import copy
import io
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import prune

from permask.sparse import (
    ZERO_PRESERVING,
    MaskedOptimizer,
    magnitude_mask,
    sparsity,
    to_torch_prune,
)

STEPS = 8


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 16),
        nn.ReLU(),
        nn.Linear(16, 3),
    )


def batches(n: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(8, 2, 5, 5, generator=g), torch.randn(8, 3, generator=g)) for _ in range(n)
    ]


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def effective(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters as the forward sees them (``weight_orig * weight_mask`` under prune)."""
    out = {}
    for name, p in model.named_parameters():
        if name.endswith("_orig"):
            module = model.get_submodule(name.rpartition(".")[0])
            attr = name.rpartition(".")[2][: -len("_orig")]
            out[name[: -len("_orig")]] = p.detach() * getattr(module, f"{attr}_mask")
        else:
            out[name] = p.detach()
    return out


def assert_exact_zeros(model: nn.Module, opt: MaskedOptimizer, mask: dict) -> None:
    named = dict(model.named_parameters())
    for name, m in mask.items():
        p = named[name]
        assert torch.count_nonzero(p.detach()[~m]) == 0, f"weight {name}"
        assert p.grad is None or torch.count_nonzero(p.grad[~m]) == 0, f"grad {name}"
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                assert torch.count_nonzero(value[~m]) == 0, f"state {key} of {name}"


OPTIMIZERS = {
    "sgd-wd": (torch.optim.SGD, dict(lr=0.1, weight_decay=5e-4)),
    "sgd-momentum-wd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4)),
    "sgd-nesterov-wd": (
        torch.optim.SGD,
        dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
    ),
    "sgd-momentum-foreach": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, foreach=True)),
    "adam-l2": (torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-2)),
    "adam-amsgrad": (torch.optim.Adam, dict(lr=1e-2, amsgrad=True)),
    "adam-fused": (torch.optim.Adam, dict(lr=1e-2, fused=True)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "adamw-foreach": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1, foreach=True)),
    "rmsprop-centered-momentum": (
        torch.optim.RMSprop,
        dict(lr=1e-2, momentum=0.5, centered=True, weight_decay=1e-3),
    ),
    "adagrad": (torch.optim.Adagrad, dict(lr=0.1, initial_accumulator_value=0.1)),
    "adadelta-wd": (torch.optim.Adadelta, dict(lr=1.0, weight_decay=1e-2)),
    "asgd": (torch.optim.ASGD, dict(lr=1e-2, t0=2)),
    "rprop": (torch.optim.Rprop, dict(lr=1e-2)),
    "adamax": (torch.optim.Adamax, dict(lr=1e-2)),
    "nadam-decoupled": (
        torch.optim.NAdam,
        dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
    ),
    "radam": (torch.optim.RAdam, dict(lr=1e-2, weight_decay=1e-2)),
    "sgd-maximize": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, maximize=True)),
    "adam-maximize": (torch.optim.Adam, dict(lr=1e-2, maximize=True)),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_trajectory_equals_prune_reference_and_zeros_are_exact(name):
    opt_cls, kwargs = OPTIMIZERS[name]
    ours = make_model()
    ref = copy.deepcopy(ours)
    mask = magnitude_mask(ours, 0.7)
    opt = MaskedOptimizer(opt_cls(ours.parameters(), **kwargs), mask, ours)
    to_torch_prune(ref, mask)
    ref_opt = opt_cls(ref.parameters(), **kwargs)
    for x, y in batches():
        for model, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            loss_fn(model, x, y).backward()
            o.step()
        got, want = effective(ours), effective(ref)
        for key in want:
            assert torch.equal(got[key], want[key]), f"{name}: {key} diverged"
        assert_exact_zeros(ours, opt, mask)
    assert sparsity({n: p != 0 for n, p in effective(ours).items() if n in mask}).overall >= 0.7


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_post_step_pass_is_skipped_exactly_where_zeros_survive_without_it(name):
    """The default skips the pass after the step only for ZERO_PRESERVING optimizers, and those
    keep exact zeros without it; the others (Adamax, Rprop) leave non-zero pruned state."""
    opt_cls, kwargs = OPTIMIZERS[name]
    model = make_model()
    mask = magnitude_mask(model, 0.7)
    opt = MaskedOptimizer(opt_cls(model.parameters(), **kwargs), mask, model)
    assert opt.post_step_mask == (opt_cls not in ZERO_PRESERVING)
    opt.post_step_mask = False
    for x, y in batches(3):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    if opt_cls in ZERO_PRESERVING:
        assert_exact_zeros(model, opt, mask)
    else:
        with pytest.raises(AssertionError, match="state"):
            assert_exact_zeros(model, opt, mask)


def test_subclass_of_a_zero_preserving_optimizer_is_masked_after_the_step():
    class ClippedSGD(torch.optim.SGD):
        pass

    model = make_model()
    opt = MaskedOptimizer(ClippedSGD(model.parameters(), lr=0.1), magnitude_mask(model, 0.5), model)
    assert opt.post_step_mask


def test_lbfgs_closure_non_elementwise_optimizer():
    """LBFGS mixes all entries through dot products and needs a closure: grads must be masked
    inside the closure. Summation order differs from the reference, hence allclose."""
    ours = make_model()
    ref = copy.deepcopy(ours)
    mask = magnitude_mask(ours, 0.5)
    opt = MaskedOptimizer(torch.optim.LBFGS(ours.parameters(), lr=0.5, max_iter=4), mask, ours)
    to_torch_prune(ref, mask)
    ref_opt = torch.optim.LBFGS(ref.parameters(), lr=0.5, max_iter=4)
    for x, y in batches(3):
        for model, o in ((ours, opt), (ref, ref_opt)):

            def closure(model=model, o=o, x=x, y=y):
                o.zero_grad()
                loss = loss_fn(model, x, y)
                loss.backward()
                return loss

            o.step(closure)
        got, want = effective(ours), effective(ref)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6)
        assert_exact_zeros(ours, opt, mask)


def test_grad_scaler_cpu_and_skipped_step():
    """scaler.step(masked) unscales through the proxied param_groups, then calls our step."""
    ours = make_model()
    ref = copy.deepcopy(ours)
    mask = magnitude_mask(ours, 0.6)
    opt = MaskedOptimizer(torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9), mask, ours)
    to_torch_prune(ref, mask)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in range(2)]
    for step, (x, y) in enumerate(batches()):
        for model, o, scaler in ((ours, opt, scalers[0]), (ref, ref_opt, scalers[1])):
            o.zero_grad()
            scaler.scale(loss_fn(model, x, y)).backward()
            if step == 3:  # an overflow: the step must be skipped and the scale reduced
                next(model.parameters()).grad.view(-1)[0] = float("inf")
            scaler.unscale_(o)
            scaler.step(o)
            scaler.update()
        got, want = effective(ours), effective(ref)
        for key in want:
            assert torch.equal(got[key], want[key])
        if step == 3:  # skipped: step() never ran, so the (inf) grads are left as they are
            ours.zero_grad()
        assert_exact_zeros(ours, opt, mask)
    assert scalers[0].get_scale() == scalers[1].get_scale() < 2.0**10


def test_clip_grad_norm_masks_before_clipping():
    model = make_model()
    mask = magnitude_mask(model, 0.5)
    opt = MaskedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), mask, model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    kept = sum(int(m.sum()) for m in mask.values())
    dense = sum(p.numel() for n, p in model.named_parameters() if n not in mask)
    norm = opt.clip_grad_norm_(1.0)
    assert norm.item() == pytest.approx((kept + dense) ** 0.5)
    total = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm()
    assert total.item() == pytest.approx(1.0, rel=1e-5)
    assert_exact_zeros(model, opt, mask)


def test_state_dict_round_trip_and_resume():
    model = make_model()
    mask = magnitude_mask(model, 0.6)
    opt = MaskedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), mask, model)
    data = batches()
    for x, y in data[:4]:
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    resumed = copy.deepcopy(model)
    full = {n: torch.ones_like(m) for n, m in mask.items()}
    opt2 = MaskedOptimizer(torch.optim.AdamW(resumed.parameters(), lr=1e-2), full, resumed)
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups", "mask"}
    buffer = io.BytesIO()  # through a file, as a checkpoint (a live state_dict shares tensors)
    torch.save(sd, buffer)
    buffer.seek(0)
    opt2.load_state_dict(torch.load(buffer))
    assert all(torch.equal(opt2.mask[n], m) for n, m in mask.items())
    for x, y in data[4:]:
        for m, o in ((model, opt), (resumed, opt2)):
            o.zero_grad()
            loss_fn(m, x, y).backward()
            o.step()
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert_exact_zeros(resumed, opt2, mask)


def test_set_mask_zeroes_weights_and_existing_state():
    model = make_model()
    opt = MaskedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), magnitude_mask(model, 0.2), model
    )
    x, y = batches(1)[0]
    loss_fn(model, x, y).backward()
    opt.step()
    stricter = magnitude_mask(model, 0.6, mask=opt.mask)
    opt.set_mask(stricter)
    assert_exact_zeros(model, opt, stricter)
    opt.zero_grad()
    loss_fn(model, x, y).backward()
    opt.step()
    assert_exact_zeros(model, opt, stricter)


def test_lr_scheduler_and_param_groups_proxy():
    model = make_model()
    mask = magnitude_mask(model, 0.5)
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = MaskedOptimizer(inner, mask, model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
        for x, y in batches(4):
            opt.zero_grad()
            loss_fn(model, x, y).backward()
            opt.step()
            sched.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    extra = nn.Parameter(torch.zeros(3))
    opt.add_param_group({"params": [extra]})
    assert opt.param_groups is inner.param_groups and len(inner.param_groups) == 2


def test_names_from_named_parameters_optimizer():
    model = make_model()
    mask = magnitude_mask(model, 0.5)
    opt = MaskedOptimizer(torch.optim.Adam(model.named_parameters(), lr=1e-2), mask)
    x, y = batches(1)[0]
    loss_fn(model, x, y).backward()
    opt.step()
    assert_exact_zeros(model, opt, mask)
    with pytest.raises(ValueError, match="pass the model"):
        MaskedOptimizer(torch.optim.Adam(model.parameters()), mask)


def test_ddp_single_process_gloo():
    """DDP (world size 1, gloo): names resolve through the wrapper; same result as no DDP."""
    model = make_model()
    plain = copy.deepcopy(model)
    mask = magnitude_mask(model, 0.5)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = MaskedOptimizer(torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9), mask, ddp)
        ref = MaskedOptimizer(
            torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9), mask, plain
        )
        for x, y in batches(3):
            for m, o in ((ddp, opt), (plain, ref)):
                o.zero_grad()
                loss_fn(m, x, y).backward()
                o.step()
        assert not any(name.endswith("mask") for name, _ in ddp.named_buffers())
    finally:
        dist.destroy_process_group()
    for a, b in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b)
    assert_exact_zeros(model, opt, mask)


def test_errors_name_the_parameter_and_the_fix():
    model = make_model()
    mask = magnitude_mask(model, 0.5)
    make = lambda m: MaskedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), m, model)  # noqa: E731
    with pytest.raises(ValueError, match=r"'3\.weight'.*\(16, 50\).*\(16, 100\)"):
        make({**mask, "3.weight": torch.ones(16, 50, dtype=torch.bool)})
    with pytest.raises(TypeError, match=r"'3\.weight' must be a bool tensor.*\.bool\(\)"):
        make({**mask, "3.weight": mask["3.weight"].float()})
    with pytest.raises(KeyError, match="'fc.weight' is not a parameter of Sequential"):
        make({"fc.weight": mask["3.weight"]})
    with pytest.raises(ValueError, match="not optimized"):
        MaskedOptimizer(torch.optim.SGD(model[0].parameters(), lr=0.1), mask, model)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        MaskedOptimizer(object(), mask, model)


def test_prune_reference_is_dense_under_the_mask():
    """Why not torch prune: its stored weight_orig keeps non-zero values under the mask."""
    model = make_model()
    mask = magnitude_mask(model, 0.5)
    to_torch_prune(model, mask)
    assert torch.count_nonzero(model[0].weight_orig.detach()[~mask["0.weight"]]) > 0
    prune.remove(model[0], "weight")
    assert torch.count_nonzero(model[0].weight.detach()[~mask["0.weight"]]) == 0


def test_swapped_arguments_and_names_get_their_fix():
    """Misuse a user hits: model and mask swapped, a name with a wrapper prefix, a tied
    weight's second name, a pruning reparametrization still installed."""
    model = make_model()
    mask = magnitude_mask(model, 0.5)
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=0.1)  # noqa: E731
    with pytest.raises(TypeError, match=r"order is MaskedOptimizer\(optimizer, mask, model\)"):
        MaskedOptimizer(sgd(model), model, mask)
    with pytest.raises(KeyError, match="Did you mean '3.weight'"):
        MaskedOptimizer(sgd(model), {"module.3.weight": mask["3.weight"]}, model)
    tied = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 6), nn.Linear(6, 10, bias=False))
    tied[2].weight = tied[0].weight
    with pytest.raises(KeyError, match=r"'2.weight' is not a parameter.*tied to '0.weight'"):
        MaskedOptimizer(sgd(tied), {"2.weight": torch.ones(10, 6, dtype=torch.bool)}, tied)
    to_torch_prune(model, mask)
    with pytest.raises(KeyError, match=r"still has a pruning reparametrization.*from_torch_prune"):
        MaskedOptimizer(sgd(model), mask, model)


def test_the_mask_is_a_copy():
    """Editing the caller's mask afterwards changes neither what is applied nor what is saved."""
    model = make_model()
    mask = magnitude_mask(model, 0.5)
    kept = {n: m.clone() for n, m in mask.items()}
    opt = MaskedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), mask, model)
    mask["3.weight"][:] = False
    assert all(torch.equal(opt.state_dict()["mask"][n], kept[n]) for n in kept)
    x, y = batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert torch.count_nonzero(model[3].weight.detach()) == int(kept["3.weight"].sum())


def test_a_new_mask_warns_when_state_cannot_be_masked():
    """L-BFGS keeps a flat history that describes the old mask: a changed mask warns; the same
    mask, a state-dict load and shape-matching state (SGD momentum) do not."""
    model = make_model()
    mask = magnitude_mask(model, 0.5)
    x, y = batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt = MaskedOptimizer(torch.optim.LBFGS(model.parameters(), max_iter=3), mask, model)
    opt.step(closure)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.set_mask(mask)
        opt.load_state_dict(opt.state_dict())
    with pytest.warns(UserWarning, match="LBFGS holds state .* Create a new optimizer"):
        opt.set_mask(magnitude_mask(model, 0.8))
    # L-BFGS keeps its state under the group's first parameter, here one the mask leaves dense
    later = magnitude_mask(model, 0.5, include=["5.weight"])
    opt = MaskedOptimizer(torch.optim.LBFGS(model.parameters(), max_iter=3), later, model)
    opt.step(closure)
    with pytest.warns(UserWarning, match="LBFGS holds state"):
        opt.set_mask(magnitude_mask(model, 0.8, include=["5.weight"]))
    model = make_model()
    opt = MaskedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), mask, model)
    closure().item()
    opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.set_mask(magnitude_mask(model, 0.8))
