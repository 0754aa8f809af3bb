"""Datasets as in-memory uint8 tensors: where to find them, how to read them, and a decode cache.

Names: ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100`` and ``imagefolder:PATH``.
The data root is the explicit ``root`` argument, else ``$PERMASK_DATA``; under it each set may be
in torchvision's layout (``MNIST/raw``, ``FashionMNIST/raw``, ``cifar-10-batches-py``,
``cifar-100-python``) or, for CIFAR, as JPEG folders ``cifar10/{train,test}/<class>/*.jpg``.
Fashion-MNIST is also read from Debian's ``dataset-fashion-mnist`` (gzipped IDX files in
``/usr/share/datasets/fashion-mnist``). Otherwise torchvision downloads into the root (or
``~/.cache/permask/data`` when no root is set); when that fails too, ``DataNotFoundError`` lists
every place searched, and whatever the failed download created is removed again.

Decoded JPEG folders are cached as one ``.pt`` file (atomic write, loaded with
``weights_only=True``) under ``$PERMASK_CACHE`` or ``$XDG_CACHE_HOME/permask`` (default
``~/.cache/permask``), never next to the data: data roots are often read-only or shared. The cache
key hashes the folder's absolute path and its file list, so edits to the folder invalidate it.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from permask._atomic import atomic_save

__all__ = [
    "DATASETS",
    "DataNotFoundError",
    "DatasetInfo",
    "cache_dir",
    "data_root",
    "image_folder_split",
    "load_dataset",
]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


class DataNotFoundError(FileNotFoundError):
    """A dataset is in none of the places searched (the message lists them)."""


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset: classes and per-channel normalisation (in [0, 1] units)."""

    num_classes: int
    in_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool  # flip + crop(pad 4) for natural images; none for digits/clothing


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(10, 1, (0.1307,), (0.3081,), augment=False),
    "fashion_mnist": DatasetInfo(10, 1, (0.2860,), (0.3530,), augment=False),
    "cifar10": DatasetInfo(10, 3, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), augment=True),
    "cifar100": DatasetInfo(
        100, 3, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), augment=True
    ),
}
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DOWNLOAD_NAMES = {  # what torchvision's download writes under the root, per dataset
    "mnist": ("MNIST",),
    "fashion_mnist": ("FashionMNIST",),
    "cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz"),
    "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz"),
}


def data_root(root: str | os.PathLike | None = None) -> Path | None:
    """The data root: ``root`` if given, else ``$PERMASK_DATA``, else ``None``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("PERMASK_DATA")
    return Path(env).expanduser() if env else None


def cache_dir() -> Path:
    """Where permask caches decoded data and downloads (``$PERMASK_CACHE`` overrides)."""
    env = os.environ.get("PERMASK_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "permask"


def load_dataset(
    name: str,
    train: bool,
    root: str | os.PathLike | None = None,
    *,
    download: bool = True,
    image_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, DatasetInfo]:
    """Load a split as ``(images uint8 [N, C, H, W], labels int64 [N], info)``.

    ``image_size`` resizes ImageFolder images (needed when their sizes differ); the built-in
    sets keep their native size. ``download=False`` turns the torchvision fallback off.
    """
    base = data_root(root)
    if name.startswith("imagefolder:"):
        folder = image_folder_split(name, train)
        x, y = _load_image_folder(folder, image_size)
        num_classes = sum(d.is_dir() for d in folder.iterdir())
        mean, std = IMAGENET_MEAN_STD  # generic natural-image statistics
        return x, y, DatasetInfo(num_classes, x.shape[1], mean, std, augment=True)
    if name not in DATASETS:
        choices = ", ".join([*DATASETS, "imagefolder:PATH"])
        raise ValueError(f"unknown dataset {name!r}; choose one of {choices}")
    info = DATASETS[name]
    roots = [r for r in (base, cache_dir() / "data") if r is not None]
    searched: list[str] = []
    for r in roots:
        found = _find_local(name, r, train, searched)
        if found is not None:
            return (*found, info)
    if name == "fashion_mnist":
        found = _read_idx_dir(DEBIAN_FASHION_MNIST, train, searched)
        if found is not None:
            return (*found, info)
    where = "; ".join(searched)
    if not download:
        raise DataNotFoundError(f"dataset {name!r} not found (download=False); searched: {where}")
    target = roots[0]
    try:
        return (*_download(name, target, train), info)
    except Exception as err:  # offline, proxy, checksum: all mean "not found"
        msg = f"dataset {name!r} not found; searched: {where}; download into {target} failed: "
        raise DataNotFoundError(msg + f"{type(err).__name__}: {err}") from err


def image_folder_split(name: str, train: bool) -> Path:
    """The folder of ``imagefolder:PATH``'s split: ``PATH/train``, or for evaluation
    ``PATH/test`` or else ``PATH/val`` (ImageNet's name); ``PATH`` itself when it has neither."""
    path = Path(name.partition(":")[2]).expanduser()
    options = [path / "train"] if train else [path / "test", path / "val"]
    folder = next((p for p in options if p.is_dir()), path)
    if not folder.is_dir():
        searched = ", ".join(str(p) for p in [*options, path])
        raise DataNotFoundError(f"image folder not found: searched {searched}")
    return folder


def _find_local(name: str, root: Path, train: bool, searched: list[str]):
    split = "train" if train else "test"
    if name in ("mnist", "fashion_mnist"):
        sub = "MNIST" if name == "mnist" else "FashionMNIST"
        return _read_idx_dir(root / sub / "raw", train, searched)
    folder = root / name / split  # cifar10 / cifar100 as JPEG folders
    searched.append(str(folder))
    if folder.is_dir():
        return _load_image_folder(folder, None)
    pickled = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    searched.append(str(pickled))
    if pickled.is_dir():
        return _read_cifar_pickles(name, pickled, train)
    return None


def _read_idx_dir(folder: Path, train: bool, searched: list[str]):
    """MNIST-style IDX files, plain or gzipped (torchvision's raw/ and Debian's layout)."""
    searched.append(str(folder))
    prefix = "train" if train else "t10k"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    paths = []
    for stem in stems:
        options = [folder / stem, folder / f"{stem}.gz"]
        hit = next((p for p in options if p.is_file()), None)
        if hit is None:
            return None
        paths.append(hit)
    images = _read_idx(paths[0])
    return images.unsqueeze(1).contiguous(), _read_idx(paths[1]).long()


def _read_idx(path: Path) -> torch.Tensor:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    flat = torch.frombuffer(bytearray(data[4 + 4 * ndim :]), dtype=torch.uint8)
    return flat.reshape(shape)


def _read_cifar_pickles(name: str, folder: Path, train: bool):
    if name == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        key = b"labels"
    else:
        files = ["train" if train else "test"]
        key = b"fine_labels"
    xs, ys = [], []
    for fname in files:
        with open(folder / fname, "rb") as f:
            entry = pickle.load(f, encoding="bytes")  # trusted torchvision format
        xs.append(torch.as_tensor(entry[b"data"]).reshape(-1, 3, 32, 32))
        ys.append(torch.as_tensor(entry[key]))
    return torch.cat(xs), torch.cat(ys).long()


def _download(name: str, root: Path, train: bool):
    import torchvision.datasets as tvd

    cls = {
        "mnist": tvd.MNIST,
        "fashion_mnist": tvd.FashionMNIST,
        "cifar10": tvd.CIFAR10,
        "cifar100": tvd.CIFAR100,
    }[name]
    with _undone_on_failure(root, DOWNLOAD_NAMES[name]):
        root.mkdir(parents=True, exist_ok=True)
        ds = cls(str(root), train=train, download=True)
    x = torch.as_tensor(ds.data)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    return x.contiguous(), torch.as_tensor(ds.targets).long()


@contextmanager
def _undone_on_failure(root: Path, names: tuple[str, ...]) -> Iterator[None]:
    """If the block raises, remove what it created: ``root`` and its missing parents, or else
    whatever is new under ``root/<name>`` for ``names`` (the folders torchvision writes).

    Files and folders that were there before are kept, so a failed download leaves the disk as
    it found it.
    """
    missing = [p for p in (root, *root.parents) if not p.exists()]
    before = set(_entries(root, names))
    try:
        yield
    except BaseException:
        if missing:  # the topmost folder that did not exist
            shutil.rmtree(missing[-1], ignore_errors=True)
        else:
            new = set(_entries(root, names)) - before
            for path in sorted(new, key=lambda p: len(p.parts), reverse=True):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        raise


def _entries(root: Path, names: tuple[str, ...]) -> Iterator[Path]:
    for name in names:
        path = root / name
        if path.exists() or path.is_symlink():
            yield path
            if path.is_dir():
                yield from path.rglob("*")


def _load_image_folder(folder: Path, image_size: int | None):
    """Decode ``folder/<class>/*`` (sorted classes, as ``ImageFolder``), cached on disk."""
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    files = [
        (c, p.name)
        for c in classes
        for p in sorted((folder / c).iterdir())
        if p.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not files:
        raise DataNotFoundError(f"no images in {folder} (expected {folder}/<class>/<image>)")
    key = hashlib.sha256(repr((str(folder.resolve()), image_size, files)).encode()).hexdigest()
    cache = cache_dir() / "decoded" / f"{folder.name}-{key[:16]}.pt"
    if cache.is_file():
        blob = torch.load(cache, weights_only=True)
        return blob["images"], blob["labels"]
    images, labels = _decode(folder, classes, files, image_size)
    atomic_save({"images": images, "labels": labels}, cache)
    return images, labels


def _decode(folder: Path, classes: list[str], files, image_size: int | None):
    import numpy as np
    from PIL import Image

    index = {c: i for i, c in enumerate(classes)}
    images = []
    for c, fname in files:
        with Image.open(folder / c / fname) as im:
            im = im.convert("RGB")
            if image_size is not None:
                im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
            img = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
        if image_size is None and images and img.shape != images[0].shape:
            raise ValueError(
                f"images in {folder} differ in size ({tuple(images[0].shape)} vs "
                f"{tuple(img.shape)} at {c}/{fname}); pass image_size to resize them"
            )
        images.append(img)
    labels = torch.tensor([index[c] for c, _ in files], dtype=torch.long)
    return torch.stack(images).contiguous(), labels


def normalize(
    x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, channels_last: bool
) -> torch.Tensor:
    """uint8 images (on their device) -> float ``(x - mean) / std``, channels_last if asked;
    ``mean`` and ``std`` are [1, C, 1, 1] in pixel units (0-255)."""
    x = (x.float() - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def subset_indices(n: int, size: int | None) -> torch.Tensor:
    """The sorted indices of a fixed random subset of ``size`` of ``n`` examples (drawn with
    seed 0, the same for every run seed); all of them when ``size`` is None or >= ``n``."""
    if size is None or size >= n:
        return torch.arange(n)
    if size < 1:
        raise ValueError(f"subset size must be >= 1, got {size}")
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:size].sort().values
