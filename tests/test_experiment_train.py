import subprocess
import sys

import pytest
import torch
from shared_data import one_thread, sigkill_once_written  # noqa: F401

from permask.data.loader import get_loaders
from permask.experiment.train import (
    checkpoint_path,
    evaluate,
    load_checkpoint,
    predict_proba,
    train,
)
from permask.models import mlp

pytestmark = pytest.mark.usefixtures("one_thread")
KW = dict(epochs=4, lr=0.05, weight_decay=5e-4, progress=False)


def _setup(root, seed=0):
    """An MLP and loaders on ``root`` (the ``mnist_dir`` fixture: generated MNIST-format digits)."""
    train_loader, test_loader, _ = get_loaders(
        "mnist", root, batch_size=100, train_subset=1000, test_subset=1000, seed=seed
    )
    torch.manual_seed(seed)
    return mlp(hidden=(64, 64)), train_loader, test_loader


class Crash(RuntimeError):
    pass


class CrashingLoader:
    """Wraps a loader and raises after ``after`` batches in total."""

    def __init__(self, loader, after):
        self.loader, self.after = loader, after

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, e):
        self.loader.set_epoch(e)

    def __iter__(self):
        for batch in self.loader:
            if self.after == 0:
                raise Crash
            self.after -= 1
            yield batch


def _assert_same(a, b):
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(v, w), k


@pytest.mark.outcome
def test_learns_and_evaluates(mnist_dir):
    model, tr, te = _setup(mnist_dir)
    res = train(model, tr, **KW)
    assert [h["epoch"] for h in res.history] == [1, 2, 3, 4]
    loss, acc = evaluate(model, te)
    assert acc > 0.8 and loss < 0.7
    model.train()
    probs = predict_proba(model, te)
    assert model.training  # mode restored
    assert probs.shape == (1000, 10)
    torch.testing.assert_close(probs.sum(1), torch.ones(1000))
    assert (probs.argmax(1) == te.labels).float().mean().item() == pytest.approx(acc)


def test_resume_after_crash_is_bit_identical(tmp_path, mnist_dir):
    ref, tr, _ = _setup(mnist_dir)
    train(ref, tr, **KW)
    model, tr, _ = _setup(mnist_dir)
    with pytest.raises(Crash):
        train(model, CrashingLoader(tr, after=25), checkpoint_dir=tmp_path, **KW)  # in epoch 3
    assert load_checkpoint(checkpoint_path(tmp_path))["epoch"] == 2
    model, tr, _ = _setup(mnist_dir, seed=0)
    torch.manual_seed(123)  # the resumed run must not depend on the RNG state it starts with
    res = train(model, tr, checkpoint_dir=tmp_path, **KW)
    assert res.resumed_from == 2 and len(res.history) == 4
    _assert_same(model, ref)
    again = train(model, tr, checkpoint_dir=tmp_path, **KW)  # finished: nothing to do
    assert again.resumed_from == 4
    with pytest.raises(ValueError, match="different run"):
        train(model, tr, checkpoint_dir=tmp_path, **{**KW, "epochs": 5})


def test_rewind_points_and_weights_only(tmp_path, mnist_dir):
    model, tr, _ = _setup(mnist_dir)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, tr, checkpoint_dir=tmp_path, keep_epochs=(0, 2), checkpoint_every=10, **KW)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["epoch_0.pt", "epoch_2.pt", "last.pt"]
    e0 = torch.load(tmp_path / "epoch_0.pt", weights_only=True)
    assert e0["epoch"] == 0 and all(torch.equal(init[k], v) for k, v in e0["model"].items())
    e2 = load_checkpoint(tmp_path / "epoch_2.pt")
    assert e2["epoch"] == 2 and len(e2["history"]) == 2
    # LR rewinding: continuing the schedule from epoch 2 reproduces the full run.
    cont, tr, _ = _setup(mnist_dir)
    load_checkpoint(tmp_path / "epoch_2.pt", cont)
    train(cont, tr, start_epoch=2, checkpoint_dir=tmp_path / "c", **KW)
    last = load_checkpoint(tmp_path / "c" / "last.pt")
    assert last["epoch"] == 4 and len(last["history"]) == 2


def test_masked_training_keeps_zeros_across_resume(tmp_path, mnist_dir):
    model, tr, _ = _setup(mnist_dir)
    mask = {"fc1.weight": torch.rand(64, 784) < 0.1, "head.weight": torch.rand(10, 64) < 0.5}
    with pytest.raises(Crash):
        train(model, CrashingLoader(tr, after=15), mask=mask, checkpoint_dir=tmp_path, **KW)
    model, tr, _ = _setup(mnist_dir)
    train(model, tr, mask=mask, checkpoint_dir=tmp_path, **KW)
    for name, m in mask.items():
        w = model.get_parameter(name)
        assert torch.all(w[~m] == 0) and torch.all(w[m] != 0)
    ref, tr, _ = _setup(mnist_dir)
    train(ref, tr, mask=mask, **KW)
    _assert_same(model, ref)


SCRIPT = """
import sys, time, torch
torch.set_num_threads(1)
from permask.data.loader import get_loaders
from permask.models import mlp
from permask.experiment.train import train

ckpt, slow = sys.argv[1], float(sys.argv[2])
tr, _, _ = get_loaders("mnist", {root!r}, batch_size=100, train_subset=2000)
class Slow:
    def __len__(self): return len(tr)
    def set_epoch(self, e): tr.set_epoch(e)
    def __iter__(self):
        for b in tr:
            time.sleep(slow)
            yield b
torch.manual_seed(0)
model = mlp(hidden=(64, 64))
train(model, Slow(), epochs=5, lr=0.05, progress=False, checkpoint_dir=ckpt)
torch.save(model.state_dict(), ckpt + "/final.pt")
"""


def test_sigkill_mid_training_then_resume(tmp_path, mnist_dir):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(root=str(mnist_dir)))

    ref, _, _ = _setup(mnist_dir)  # one thread (fixture), as in the script: same kernels, same bits
    tr, _, _ = get_loaders("mnist", mnist_dir, batch_size=100, train_subset=2000)
    train(ref, tr, epochs=5, lr=0.05, progress=False)
    killed = tmp_path / "killed"
    killed.mkdir()
    proc = subprocess.Popen([sys.executable, str(script), str(killed), "0.01"])
    # 0.1 s after the first checkpoint: into the next epoch (20 batches x 10 ms per epoch)
    sigkill_once_written(proc, checkpoint_path(killed), timeout=90, settle=0.1)
    epoch = load_checkpoint(checkpoint_path(killed))["epoch"]
    assert 1 <= epoch < 5
    assert not (killed / "final.pt").exists()
    subprocess.run([sys.executable, str(script), str(killed), "0"], check=True)
    got = torch.load(killed / "final.pt", weights_only=True)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, got[k]), k


class Spiky:
    """Wraps a loader; batch ``at`` of every epoch gets inputs x1000: finite in fp16, but its
    scaled fp16 gradients overflow, so the GradScaler must skip that step."""

    def __init__(self, loader, at):
        self.loader, self.at = loader, at

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, e):
        self.loader.set_epoch(e)

    def __iter__(self):
        for i, (x, y) in enumerate(self.loader):
            yield (x * 1000 if i == self.at else x), y


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_keeps_pruned_weights_zero_and_resumes_exactly(tmp_path, mnist_dir, amp):
    mask = {"fc1.weight": torch.rand(64, 784) < 0.1, "head.weight": torch.rand(10, 64) < 0.5}
    kw = {**KW, "amp": amp, "mask": mask}
    ref, tr, _ = _setup(mnist_dir)
    fp32, _, _ = _setup(mnist_dir)
    train(ref, Spiky(tr, at=3), **kw)
    train(fp32, Spiky(tr, at=3), **{**kw, "amp": "off"})
    assert any(not torch.equal(a, b) for a, b in zip(ref.parameters(), fp32.parameters()))
    model, tr, _ = _setup(mnist_dir)
    with pytest.raises(Crash):
        train(model, CrashingLoader(Spiky(tr, at=3), after=25), checkpoint_dir=tmp_path, **kw)
    ckpt = load_checkpoint(checkpoint_path(tmp_path))
    if amp == "fp16":  # the spikes overflowed: steps skipped, the scale backed off from 2**16
        assert ckpt["scaler"]["scale"] < 2.0**16 and ckpt["meta"]["amp"] == "fp16"
    model, tr, _ = _setup(mnist_dir)
    train(model, Spiky(tr, at=3), checkpoint_dir=tmp_path, **kw)
    _assert_same(model, ref)
    for name, m in mask.items():
        assert not model.get_parameter(name)[~m].any()
    with pytest.raises(ValueError, match="different run"):
        train(model, tr, checkpoint_dir=tmp_path, **{**kw, "amp": "off"})


def test_sync_batchnorm_shares_weights_and_is_undone():
    """SyncBatchNorm needs CUDA to run (tests/test_cuda.py); the swap itself is checked here."""
    from permask.experiment.train import _sync_batchnorm
    from permask.models import resnet20

    model = resnet20(1)
    bn = model.layer1[0].bn1
    with _sync_batchnorm(model, True):
        sync = model.layer1[0].bn1
        assert isinstance(sync, torch.nn.SyncBatchNorm)
        assert sync.weight is bn.weight and sync.running_mean is bn.running_mean
    assert model.layer1[0].bn1 is bn
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    with pytest.raises(ValueError, match="sync_bn needs CUDA"):
        train(model, [], epochs=1, sync_bn=True, device="cpu")
