import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image
from shared_data import DATA as SHARED
from shared_data import needs_cifar, needs_mnist, one_thread, write_idx  # noqa: F401

from permask.data import datasets as data_mod
from permask.data.datasets import DataNotFoundError, load_dataset
from permask.data.loader import TensorLoader, get_loaders

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PERMASK_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PERMASK_DATA", raising=False)


def _write_png(img: torch.Tensor, path: Path) -> None:
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(path)


@needs_mnist
def test_mnist_from_shared_root(monkeypatch):
    x, y, info = load_dataset("mnist", False, SHARED)
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.uint8
    assert y.dtype == torch.long and y.bincount().tolist()[0] == 980
    monkeypatch.setenv("PERMASK_DATA", str(SHARED))
    x2, _, _ = load_dataset("mnist", False)
    assert torch.equal(x, x2)
    assert info.num_classes == 10 and info.in_channels == 1


def test_mnist_layout_by_name_and_from_permask_data(mnist_dir, monkeypatch):
    """torchvision's raw/ layout (plain IDX files), found by name under a root or $PERMASK_DATA."""
    x, y, info = load_dataset("mnist", False, mnist_dir)
    assert x.shape == (1000, 1, 28, 28) and x.dtype == torch.uint8
    assert y.dtype == torch.long and y.shape == (1000,) and set(y.tolist()) == set(range(10))
    monkeypatch.setenv("PERMASK_DATA", str(mnist_dir))
    assert torch.equal(load_dataset("mnist", False)[0], x)
    assert load_dataset("mnist", True)[0].shape == (10000, 1, 28, 28)
    assert info.num_classes == 10 and info.in_channels == 1


def test_a_failed_download_removes_what_it_created(tmp_path, monkeypatch):
    """A real torchvision download through a proxy that refuses connections: it fails, and the
    disk is left as it was (a new root and its parents removed; older files in a root kept)."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    fresh = tmp_path / "new" / "data"
    with pytest.raises(DataNotFoundError, match=f"download into {fresh} failed"):
        load_dataset("mnist", True, fresh)
    assert not (tmp_path / "new").exists()
    old = tmp_path / "old"
    (old / "MNIST" / "raw").mkdir(parents=True)
    (old / "MNIST" / "raw" / "notes.txt").write_text("mine")
    (old / "keep.txt").write_text("mine")
    before = sorted(old.rglob("*"))
    with pytest.raises(DataNotFoundError, match="download into"):
        load_dataset("cifar10", True, old)
    with pytest.raises(DataNotFoundError, match="download into"):
        load_dataset("mnist", True, old)
    assert sorted(old.rglob("*")) == before


def test_fashion_mnist_from_debian_gz(tmp_path, monkeypatch):
    deb = tmp_path / "deb"
    deb.mkdir()
    imgs = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    labels = torch.tensor([3, 1, 4, 1, 5], dtype=torch.uint8)
    write_idx(deb / "t10k-images-idx3-ubyte.gz", imgs)
    write_idx(deb / "t10k-labels-idx1-ubyte.gz", labels)
    monkeypatch.setattr(data_mod, "DEBIAN_FASHION_MNIST", deb)
    x, y, _ = load_dataset("fashion_mnist", False, tmp_path / "empty", download=False)
    assert torch.equal(x[:, 0], imgs) and y.tolist() == [3, 1, 4, 1, 5]


def test_missing_data_lists_places_searched(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("fashion_mnist", True, tmp_path / "nowhere", download=False)
    msg = str(err.value)
    assert "\n" not in msg
    for place in ["nowhere/FashionMNIST/raw", "no-debian", "cache/data/FashionMNIST/raw"]:
        assert place in msg
    with pytest.raises(DataNotFoundError, match="cifar10/train.*cifar-10-batches-py"):
        load_dataset("cifar10", True, tmp_path / "nowhere", download=False)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'svhn'.*imagefolder:PATH"):
        load_dataset("svhn", True)


def test_cifar_torchvision_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    raw = torch.randint(0, 256, (4, 3 * 32 * 32), dtype=torch.uint8)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": raw.numpy(), b"labels": [0, 9, 2, 3]}, f)
    x, y, info = load_dataset("cifar10", False, tmp_path, download=False)
    assert torch.equal(x.reshape(4, -1), raw) and y.tolist() == [0, 9, 2, 3]
    assert info.augment


def test_image_folder_decode_and_cache(tmp_path):
    root = tmp_path / "imgs"
    expect = {}
    for cls in ["b_cat", "a_dog"]:
        (root / "train" / cls).mkdir(parents=True)
        for j in range(3):
            img = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
            _write_png(img, root / "train" / cls / f"{j}.png")
            expect[(cls, j)] = img
    x, y, info = load_dataset(f"imagefolder:{root}", True)
    assert x.shape == (6, 3, 8, 8) and y.tolist() == [0, 0, 0, 1, 1, 1]  # classes sorted
    assert torch.equal(x[0], expect[("a_dog", 0)]) and info.num_classes == 2
    cached = list((tmp_path / "cache" / "decoded").glob("*.pt"))
    assert len(cached) == 1
    x2, _, _ = load_dataset(f"imagefolder:{root}", True)
    assert torch.equal(x, x2)
    _write_png(torch.zeros(3, 9, 9, dtype=torch.uint8), root / "train" / "a_dog" / "big.png")
    with pytest.raises(ValueError, match="differ in size.*image_size"):
        load_dataset(f"imagefolder:{root}", True)
    assert load_dataset(f"imagefolder:{root}", True, image_size=4)[0].shape == (7, 3, 4, 4)


@needs_cifar
def test_cifar10_jpeg_folders():
    x, y, _ = load_dataset("cifar10", False, SHARED)
    assert x.shape == (10000, 3, 32, 32) and y.bincount().tolist() == [1000] * 10
    assert abs(x.float().mean().item() / 255 - 0.4766) < 0.01


def test_cifar10_jpeg_folders_by_name(tmp_path):
    """The ``cifar10/{train,test}/<class>/*.jpg`` layout, found by the dataset's name."""
    for i, cls in enumerate(["airplane", "automobile"]):
        (tmp_path / "cifar10" / "test" / cls).mkdir(parents=True)
        for j in range(3):
            img = torch.full((3, 32, 32), 40 + 100 * i, dtype=torch.uint8)
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(
                tmp_path / "cifar10" / "test" / cls / f"{j}.jpg", quality=95
            )
    x, y, info = load_dataset("cifar10", False, tmp_path, download=False)
    assert x.shape == (6, 3, 32, 32) and y.tolist() == [0, 0, 0, 1, 1, 1]
    assert (x[:3].float() - 40).abs().max() <= 2 and (x[3:].float() - 140).abs().max() <= 2
    assert info.num_classes == 10 and info.augment


def test_get_loaders_subset_and_normalisation_on_generated_digits(mnist_dir):
    train, test, info = get_loaders("mnist", mnist_dir, batch_size=100, train_subset=1000)
    assert len(train) == 10 and len(test) == 1 and not train.augment
    x, y = next(iter(test))  # the test set in order, normalised by the dataset's statistics
    raw, labels, _ = load_dataset("mnist", False, mnist_dir)
    torch.testing.assert_close(x, (raw.float() / 255 - info.mean[0]) / info.std[0])
    assert torch.equal(y, labels)
    counts = train.labels.bincount()
    assert len(counts) == 10 and counts.min() > 50  # random subset, not the first class


def _toy_loader(**kw):
    x = torch.arange(10 * 3 * 4 * 4, dtype=torch.int64).remainder(256).to(torch.uint8)
    return TensorLoader(x.reshape(10, 3, 4, 4), torch.arange(10), batch_size=4, **kw)


def test_loader_epochs_are_reproducible():
    a = _toy_loader(shuffle=True, augment=True, seed=1)
    first = [y.tolist() for _, y in a]
    second = [y.tolist() for _, y in a]
    assert first != second and sorted(sum(first, [])) == list(range(10))
    b = _toy_loader(shuffle=True, augment=True, seed=1)
    b.set_epoch(1)
    assert [y.tolist() for _, y in b] == second
    b.set_epoch(0)
    for (xa, _), (xb, _) in zip(_toy_loader(shuffle=True, augment=True, seed=1), b):
        assert torch.equal(xa, xb)
    assert len(a) == 3 and len(_toy_loader(drop_last=True)) == 2
    assert len(list(_toy_loader(max_batches=2))) == 2


def test_flip_crop_is_a_shifted_window():
    x = torch.randint(1, 256, (64, 1, 6, 6), dtype=torch.uint8)
    labels = torch.zeros(64, dtype=torch.long)
    loader = TensorLoader(x, labels, batch_size=64, augment=True, std=(1 / 255,))
    out = next(iter(loader))[0].round().to(torch.uint8)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    flips = 0
    for i in range(64):
        candidates = [
            (f, p[:, dy : dy + 6, dx : dx + 6])
            for f, p in ((0, padded[i]), (1, padded[i].flip(2)))
            for dy in range(9)
            for dx in range(9)
        ]
        hits = [f for f, w in candidates if torch.equal(out[i], w)]
        assert hits, i
        flips += hits[0]
    assert 10 < flips < 54
    assert not torch.equal(out, x)


@needs_mnist
def test_get_loaders_subset_and_normalisation():
    train, test, info = get_loaders("mnist", SHARED, batch_size=100, train_subset=1000)
    assert len(train) == 10 and len(test) == 10 and not train.augment
    x, y = next(iter(test))
    assert x.dtype == torch.float32 and x.shape == (1000, 1, 28, 28)
    assert abs(x.mean().item()) < 0.2 and abs(x.std().item() - 1) < 0.2
    counts = train.labels.bincount()
    assert len(counts) == 10 and counts.min() > 50  # random subset, not the first class


def test_both_loaders_are_loaders_and_a_changed_one_is_a_copy(tmp_path):
    from shared_data import write_image_folder

    from permask.data import Loader
    from permask.data.stream import FolderLoader

    images, labels = torch.zeros(10, 1, 4, 4, dtype=torch.uint8), torch.arange(10) % 2
    tensors = TensorLoader(images, labels, batch_size=3)
    root = write_image_folder(tmp_path / "f", classes=2, per_class=2)
    folder = FolderLoader(root / "train", crop=16, batch_size=2, workers=0)
    for loader in (tensors, folder):
        assert isinstance(loader, Loader)
        bigger = loader.replace(batch_size=4, seed=7)
        assert (loader.seed, bigger.batch_size, bigger.seed) == (0, 4, 7)
        assert loader.batch_size in (2, 3)  # the original is unchanged
        assert bigger.labels is loader.labels  # the data is shared, not copied
        with pytest.raises(ValueError, match="cannot change labels of a loader"):
            loader.replace(labels=None)
        with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
            loader.replace(batch_size=0)
        with pytest.raises(ValueError, match="need 0 <= rank < world_size, got 2 and 1"):
            loader.replace(rank=2)
