"""Batches decoded from image files on the fly, for folders too large for memory (ImageNet).

:class:`FolderLoader` keeps :class:`~permask.data.loader.TensorLoader`'s contract (the
pipeline uses either): ``len()`` is the number of global batches per epoch, ``set_epoch``
fixes the epoch's order (a CPU generator seeded by ``(seed, epoch)``), ``batch_size`` is the
global batch and with ``world_size`` > 1 each rank loads only its contiguous share of each
batch; ``labels`` holds every label; ``augment=False`` switches to the evaluation transform.
Decoding and augmentation run in ``workers`` DataLoader processes (seeded per epoch, so an epoch
is reproducible for a fixed number of workers and processes); batches stay uint8 until the
device, where they are normalised (4x less to copy; pinned memory and non-blocking copies on
CUDA). The transforms are torchvision's ImageNet ones:

- training: ``RandomResizedCrop(crop)`` + horizontal flip;
- evaluation: ``Resize(round(crop * 256 / 224))`` + ``CenterCrop(crop)``.

>>> loader = FolderLoader("imagenet/train", crop=224, batch_size=256, workers=8)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from permask.data.datasets import normalize, subset_indices
from permask.data.protocol import replaced

__all__ = ["FolderLoader", "large_images"]


def large_images(folder: str | os.PathLike, min_side: int = 128) -> bool:
    """Whether the first image of ``folder/<class>/`` has both sides >= ``min_side`` pixels
    (then permask streams with ImageNet transforms instead of decoding the set into memory)."""
    from PIL import Image

    from permask.data.datasets import IMAGE_SUFFIXES

    for cls in sorted(d for d in Path(folder).iterdir() if d.is_dir()):
        for path in sorted(cls.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                with Image.open(path) as im:
                    return min(im.size) >= min_side
    return False


class FolderLoader:
    """Iterate ``(x float [B, 3, crop, crop], y long)`` batches streamed from ``folder``."""

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        crop: int = 224,
        batch_size: int = 256,
        shuffle: bool = False,
        augment: bool = False,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        seed: int = 0,
        workers: int = 4,
        device: torch.device | str = "cpu",
        channels_last: bool = False,
        max_batches: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        subset: int | None = None,
    ) -> None:
        from torchvision.datasets import ImageFolder

        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got {rank} and {world_size}")
        self.dataset = ImageFolder(str(folder))
        self.device = torch.device(device)
        labels = torch.tensor(self.dataset.targets, dtype=torch.long)
        self.indices = subset_indices(len(labels), subset)
        self.labels = labels[self.indices].to(self.device)
        self.crop, self.batch_size, self.shuffle, self.augment = crop, batch_size, shuffle, augment
        shape = (1, -1, 1, 1)
        self.mean = torch.tensor(mean, device=self.device).reshape(shape) * 255
        self.std = torch.tensor(std, device=self.device).reshape(shape) * 255
        self.seed, self.workers, self.channels_last = seed, workers, channels_last
        self.max_batches, self.rank, self.world_size = max_batches, rank, world_size
        self.epoch = 0

    @property
    def num_classes(self) -> int:
        return len(self.dataset.classes)

    def __len__(self) -> int:
        full = -(-len(self.indices) // self.batch_size)
        return full if self.max_batches is None else min(full, self.max_batches)

    def replace(self, **settings: Any) -> FolderLoader:
        """A copy with other settings (:data:`permask.data.protocol.SETTINGS`), the data shared."""
        return replaced(self, settings)

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` play epoch ``epoch``."""
        self.epoch = epoch

    def example(self, n: int = 2) -> torch.Tensor:
        """The first ``n`` inputs as a model sees them, evaluation transform (shapes, tracing)."""
        dataset = copy.copy(self.dataset)
        dataset.transform = self._transform(augment=False)
        items = _Indexed(dataset, self.indices[:n])
        x = torch.stack([items[i][0] for i in range(len(items))]).to(self.device)
        return normalize(x, self.mean, self.std, self.channels_last)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from torch.utils.data import DataLoader

        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        n = len(self.indices)
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        shares = []
        for b in range(len(self)):
            batch = order[b * self.batch_size : (b + 1) * self.batch_size]
            shares.append(torch.tensor_split(batch, self.world_size)[self.rank].tolist())
        dataset = copy.copy(self.dataset)  # the workers get this epoch's transform
        dataset.transform = self._transform(self.augment)
        dataset.target_transform = None
        loader = DataLoader(
            _Indexed(dataset, self.indices),
            batch_sampler=shares,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            generator=gen,  # the workers' seeds: a function of (seed, epoch)
            persistent_workers=False,
        )
        for x, y in loader:
            x = normalize(x.to(self.device, non_blocking=True), self.mean, self.std,
                          self.channels_last)  # fmt: skip
            yield x, y.to(self.device, non_blocking=True)

    def _transform(self, augment: bool):
        from torchvision import transforms as T

        if augment:
            steps = [T.RandomResizedCrop(self.crop), T.RandomHorizontalFlip()]
        else:
            steps = [T.Resize(round(self.crop * 256 / 224)), T.CenterCrop(self.crop)]
        return T.Compose([*steps, T.PILToTensor()])


class _Indexed(torch.utils.data.Dataset):
    """``dataset`` seen through ``indices`` (a fixed subset); images forced to RGB."""

    def __init__(self, dataset, indices: torch.Tensor) -> None:
        self.dataset, self.indices = dataset, indices.tolist()

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        path, label = self.dataset.samples[self.indices[i]]
        image = self.dataset.loader(path).convert("RGB")
        return self.dataset.transform(image), label
