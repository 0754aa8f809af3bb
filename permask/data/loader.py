"""A fast, reproducible loader over in-memory uint8 image tensors.

Batches are sliced from tensors that already sit on the target device; augmentation (random
horizontal flip and random crop with 4 pixels of zero padding, as for CIFAR) and normalisation run
on whole batches there. The shuffling order and augmentation draws come from a CPU
``torch.Generator`` seeded by ``(seed, epoch)``, so epoch ``e`` yields the same batches on every
device and after a resume, whatever ran before it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from permask.data.datasets import (
    IMAGENET_MEAN_STD,
    DatasetInfo,
    image_folder_split,
    load_dataset,
    normalize,
    subset_indices,
)
from permask.data.protocol import replaced

__all__ = ["TensorLoader", "get_loaders"]


class TensorLoader:
    """Iterate ``(x float, y long)`` batches from uint8 images held in memory.

    Each ``iter()`` plays epoch ``self.epoch`` and then advances it; ``set_epoch`` pins it (the
    trainer calls it so that a resumed run replays identical batches). ``max_batches`` caps the
    batches per epoch. ``len()`` is the number of batches per epoch.

    With ``world_size`` > 1 (one loader per process under torchrun) ``batch_size`` is the global
    batch: every rank draws the same order and augmentation and yields its contiguous share of
    each batch (``torch.tensor_split``), so N processes see the batches of one process.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int = 128,
        shuffle: bool = False,
        augment: bool = False,
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
        seed: int = 0,
        drop_last: bool = False,
        max_batches: int | None = None,
        device: torch.device | str = "cpu",
        channels_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got {rank} and {world_size}")
        if images.dtype != torch.uint8 or images.ndim != 4:
            got = f"{images.dtype} {tuple(images.shape)}"
            raise ValueError(f"images must be uint8 [N, C, H, W], got {got}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        shape = (1, -1, 1, 1)
        self.mean = torch.tensor(mean, device=self.device).reshape(shape) * 255
        self.std = torch.tensor(std, device=self.device).reshape(shape) * 255
        self.seed = seed
        self.drop_last = drop_last
        self.max_batches = max_batches
        self.channels_last = channels_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def __len__(self) -> int:
        n = len(self.images)
        full = n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
        return full if self.max_batches is None else min(full, self.max_batches)

    def replace(self, **settings: Any) -> TensorLoader:
        """A copy with other settings (:data:`permask.data.protocol.SETTINGS`), the data shared."""
        return replaced(self, settings)

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` play epoch ``epoch``."""
        self.epoch = epoch

    def example(self, n: int = 2) -> torch.Tensor:
        """The first ``n`` inputs as a model sees them, not augmented (shapes, tracing)."""
        return normalize(self.images[:n], self.mean, self.std, self.channels_last)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        n = len(self.images)
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        order = order.to(self.device)  # one copy per epoch: each blocks on a GPU's queue
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            x = self.images[idx]
            if self.augment:
                x = _flip_crop(x, gen)
            if self.world_size > 1:  # this rank's share, cut after augmenting the whole batch
                x = x.tensor_split(self.world_size)[self.rank]
                idx = idx.tensor_split(self.world_size)[self.rank]
            yield normalize(x, self.mean, self.std, self.channels_last), self.labels[idx]


def _flip_crop(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random horizontal flip, then random crop of the zero-padded batch back to its size."""
    b, c, h, w = x.shape
    flip = torch.rand(b, generator=gen) < 0.5
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    flip, dy, dx = torch.stack([flip.long(), dy, dx]).to(x.device)  # one copy, not three
    x = torch.where(flip.bool().view(b, 1, 1, 1), x.flip(3), x)
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = (dy[:, None] + torch.arange(h, device=x.device)).view(b, 1, h, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device)).view(b, 1, 1, w)
    bi = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    ci = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return padded[bi, ci, rows, cols]


def get_loaders(
    dataset: str,
    root: str | os.PathLike | None = None,
    *,
    batch_size: int = 128,
    eval_batch_size: int = 1000,
    seed: int = 0,
    device: torch.device | str = "cpu",
    train_subset: int | None = None,
    test_subset: int | None = None,
    augment: bool | None = None,
    download: bool = True,
    image_size: int | None = None,
    channels_last: bool = False,
    crop: int | None = None,
    workers: int = 4,
):
    """Train loader (shuffled, augmented if the dataset calls for it), test loader, and info.

    ``train_subset``/``test_subset`` keep a fixed random subset (drawn with seed 0, so the same
    examples for every run seed) for fast experiments and tests. ``augment`` overrides the
    dataset's default (flip + crop for CIFAR and image folders, none for (Fashion-)MNIST).

    ``imagefolder:PATH`` streams from disk with ImageNet transforms at ``crop`` pixels
    (:class:`~permask.data.stream.FolderLoader`, ``workers`` decoding processes) when
    ``crop`` is given or its images are large (>= 128 px, default crop 224); otherwise it is
    decoded into memory once, like the built-in sets.
    """
    if dataset.startswith("imagefolder:"):
        from permask.data.stream import FolderLoader, large_images

        train_dir = image_folder_split(dataset, True)
        if crop is not None or large_images(train_dir):
            common = dict(crop=crop or 224, workers=workers, device=device,
                          channels_last=channels_last)  # fmt: skip
            train = FolderLoader(train_dir, batch_size=batch_size, shuffle=True, augment=True,
                                 seed=seed, subset=train_subset, **common)  # fmt: skip
            test = FolderLoader(image_folder_split(dataset, False), batch_size=eval_batch_size,
                                subset=test_subset, **common)  # fmt: skip
            mean, std = IMAGENET_MEAN_STD
            return train, test, DatasetInfo(train.num_classes, 3, mean, std, augment=True)
    xtr, ytr, info = load_dataset(dataset, True, root, download=download, image_size=image_size)
    xte, yte, _ = load_dataset(dataset, False, root, download=download, image_size=image_size)
    xtr, ytr = _subset(xtr, ytr, train_subset)
    xte, yte = _subset(xte, yte, test_subset)
    common = dict(mean=info.mean, std=info.std, device=device, channels_last=channels_last)
    aug = info.augment if augment is None else augment
    train = TensorLoader(
        xtr, ytr, batch_size=batch_size, shuffle=True, augment=aug, seed=seed, **common
    )
    test = TensorLoader(xte, yte, batch_size=eval_batch_size, **common)
    return train, test, info


def _subset(x: torch.Tensor, y: torch.Tensor, n: int | None):
    if n is None or n >= len(x):
        return x, y
    keep = subset_indices(len(x), n)
    return x[keep], y[keep]
