"""Data for the tests: the real sets when present (skip marks when not), and small generated
files in the real formats that every checkout has.

Real data: ``$PERMASK_DATA`` if set, else ``../shared/data`` beside the project root (as CI lays it
out). Tests that assert facts of the real sets (sizes, class counts, pixel statistics) use the
``needs_*`` marks; everything else (the loaders' file formats, training, the pipeline, the CLI)
runs on :func:`write_synthetic_mnist` and friends, so a fresh clone tests it too.
"""

from __future__ import annotations

import contextlib
import gzip
import os
from pathlib import Path

import pytest
import torch

DATA = Path(
    os.environ.get("PERMASK_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")
)
_HOW = "set PERMASK_DATA to a folder that holds it (torchvision's layout) to run this test"
needs_mnist = pytest.mark.skipif(
    not (DATA / "MNIST" / "raw").is_dir(), reason=f"real MNIST not found under {DATA}; {_HOW}"
)
needs_cifar = pytest.mark.skipif(
    not (DATA / "cifar10" / "test").is_dir(),
    reason=f"CIFAR-10 JPEG folders (cifar10/test/<class>/) not found under {DATA}; {_HOW}",
)


def write_idx(path: Path, array: torch.Tensor) -> None:
    """``array`` (uint8) as an IDX file, gzipped when ``path`` ends in ``.gz``."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.numpy().tobytes())


def synthetic_digits(n: int, seed: int, size: int = 28, channels: int = 1):
    """``n`` uint8 images of 10 learnable classes and their labels: each class is a smooth random
    template, drawn at a random shift of up to 3 pixels under pixel noise. Not trivial: a
    64-64 MLP trained 4 epochs on 1000 images reaches 91% test accuracy (test loss 0.40)."""
    g = torch.Generator().manual_seed(1234)  # the same templates for every split
    base = torch.rand(10, channels, size // 4, size // 4, generator=g)
    templates = torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear")
    g.manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    shifts = torch.randint(-3, 4, (n, 2), generator=g)
    images = torch.stack(
        [templates[c].roll(tuple(s.tolist()), dims=(1, 2)) for c, s in zip(labels, shifts)]
    )
    images = images + 0.45 * torch.randn(images.shape, generator=g)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels


def write_synthetic_mnist(root: Path, n_train: int = 10000, n_test: int = 1000) -> Path:
    """MNIST's torchvision layout (``root/MNIST/raw``, plain IDX files) with synthetic digits."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = synthetic_digits(n, seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images[:, 0])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels.to(torch.uint8))
    return root


def write_image_folder(
    root: Path,
    classes: int = 4,
    per_class: int = 6,
    size: tuple[int, int] = (40, 48),
    splits: tuple[str, str] = ("train", "val"),
) -> Path:
    """``root/{train,val}/<class>/<i>.jpg``: RGB images (height, width = ``size``) whose class is
    their colour under noise, in ImageNet's folder layout (val: half as many per class).
    ``splits=("train", "test")`` with ``root/cifar10`` gives CIFAR-10's JPEG-folder layout."""
    from PIL import Image

    g = torch.Generator().manual_seed(7)
    colours = torch.rand(classes, 3, 1, 1, generator=g)
    for split, n in zip(splits, (per_class, max(1, per_class // 2))):
        for c in range(classes):
            folder = root / split / f"class{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = colours[c] + 0.2 * torch.randn(3, *size, generator=g)
                pixels = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.jpg", quality=90)
    return root


@contextlib.contextmanager
def torch_threads(n: int):
    """``n`` torch threads inside the block, whatever an earlier test set (the thread count
    changes float summation order, so a trained model's numbers depend on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """One torch thread: on a shared 2-core machine, spinning threads of parallel jobs collide."""
    with torch_threads(1):
        yield


def sigkill_once_written(proc, path: Path, timeout: float, settle: float = 0.0) -> None:
    """SIGKILL ``proc`` once it has written ``path`` (plus ``settle`` seconds); fail if it never
    does within ``timeout`` or exits first."""
    import signal
    import time

    try:
        deadline = time.monotonic() + timeout
        while not path.exists():
            assert proc.poll() is None, f"process exited before writing {path}"
            assert time.monotonic() < deadline, f"{path} never written"
            time.sleep(0.01)
        time.sleep(settle)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL


# The tiny run every pipeline test starts from (its own keys changed where a test needs to):
# an MLP on 1,000 generated digits, 2 seeds, one sparsity and rewind point, one thread.
TINY_RUN = dict(
    model="mlp",
    dataset="mnist",
    train_subset=1000,
    test_subset=300,
    epochs=2,
    seeds=2,
    sparsity=[0.5],
    rewind=[1],
    threads=1,
    progress=False,
    device="cpu",  # bit-identical resume is a CPU property (the GPU's: tests/test_cuda.py)
)


def tiny_flags(data_dir: Path, **changes) -> list[str]:
    """``TINY_RUN`` with ``changes`` as ``permask run`` flags on ``data_dir``."""
    flags = ["--data-dir", str(data_dir)]
    for key, value in {**TINY_RUN, **changes}.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            flags += [flag, *map(str, value)]
        elif value is not None:
            flags += [flag, str(value)]
    return flags


def assert_same_run_files(reference: Path, other: Path, run_stages) -> None:
    """Every stage output of the run in ``reference`` (``run_stages``, its stages) equals the
    same file under ``other``: masks and pi exactly, each model's test softmax bit for bit, the
    interpolation curves but for their timing."""
    from safetensors.torch import load_file

    from permask.graph import Permutation

    for stage in run_stages:
        for path in stage.outputs:
            theirs = other / path.relative_to(reference)
            if path.name == "pi.safetensors":
                assert Permutation.load(path) == Permutation.load(theirs)
            elif path.suffix == ".safetensors":
                a, b = load_file(path), load_file(theirs)
                assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), path
            elif path.suffix == ".pt":
                a, b = (torch.load(p, weights_only=True)["probs"] for p in (path, theirs))
                assert torch.equal(a, b), path
            else:  # interpolation.json: the same curves, its own seconds
                assert (
                    path.read_text().split('"seconds"')[0]
                    == theirs.read_text().split('"seconds"')[0]
                ), path
