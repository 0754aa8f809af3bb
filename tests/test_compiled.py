"""``compile``: the training forward under torch.compile (the ``aot_eager`` backend runs on any
CPU without a compiler) trains to the eager weights, keeps exact zeros, resumes bit-identically,
and a model that cannot compile falls back to eager with one warning and eager numbers."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from permask.experiment.train import load_checkpoint, train
from permask.sparse import magnitude_mask

# aot_eager runs the traced graph with eager kernels; inductor fuses kernels and may round
# differently. Measured on this model: aot_eager 0 (bit-identical), inductor 6e-8.
TOLERANCE = {"aot_eager": 1e-6, "inductor": 1e-5}


class _Net(nn.Module):
    def __init__(self, graph_break: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 5)
        self.graph_break = graph_break

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        if self.graph_break:
            torch._dynamo.graph_break()  # what fullgraph refuses: the fallback's cause
        x = nn.functional.max_pool2d(x, 2)
        return self.fc(x.flatten(1))


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 5, (16,), generator=g))
               for _ in range(4)]  # fmt: skip
    return batches + [
        (torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g))
    ]


def _trained(compile: str, graph_break: bool = False, **kw) -> tuple[nn.Module, dict]:
    model = _Net(graph_break)
    mask = magnitude_mask(model, 0.6)
    train(model, _batches(), epochs=2, lr=0.05, mask=mask, compile=compile, progress=False, **kw)
    return model, mask


@pytest.mark.parametrize(
    "backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)]
)  # inductor compiles C++ with the machine's compiler: ~40 s here
def test_compiled_training_reaches_the_eager_weights_with_exact_zeros(backend):
    torch._dynamo.reset()
    eager, mask = _trained("off")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # it compiled: no fallback
        compiled, _ = _trained(backend)
    worst = max(
        (p - q).abs().max().item() for p, q in zip(eager.parameters(), compiled.parameters())
    )
    assert worst <= TOLERANCE[backend]
    assert any(not torch.equal(p, q) for p, q in zip(eager.parameters(), _Net().parameters()))
    for name, keep in mask.items():
        w = compiled.get_parameter(name)
        assert torch.equal(w[~keep], torch.zeros_like(w[~keep])), name


def test_resume_under_compile_is_bit_identical(tmp_path):
    torch._dynamo.reset()
    straight, _ = _trained("aot_eager")
    model = _Net()
    mask = magnitude_mask(model, 0.6)
    common = dict(lr=0.05, mask=mask, compile="aot_eager", progress=False, checkpoint_dir=tmp_path)
    train(model, _batches(), epochs=2, **common, keep_epochs=[1])
    resumed = _Net()
    (tmp_path / "last.pt").unlink()
    (tmp_path / "epoch_1.pt").rename(tmp_path / "last.pt")  # as if killed after epoch 1
    result = train(resumed, _batches(), epochs=2, **common)
    assert result.resumed_from == 1
    assert load_checkpoint(tmp_path / "last.pt")["meta"]["compile"] == "aot_eager"
    assert all(torch.equal(p, q) for p, q in zip(straight.parameters(), resumed.parameters()))


def test_a_model_that_cannot_compile_trains_eagerly_with_one_warning():
    torch._dynamo.reset()
    eager, _ = _trained("off", graph_break=True)
    with pytest.warns(RuntimeWarning, match=r"compile=aot_eager failed \(.*\); this training "):
        fallen, _ = _trained("aot_eager", graph_break=True)
    assert all(torch.equal(p, q) for p, q in zip(eager.parameters(), fallen.parameters()))


def test_bad_setting():
    with pytest.raises(ValueError, match="compile must be one of off, inductor"):
        _trained("turbo")
