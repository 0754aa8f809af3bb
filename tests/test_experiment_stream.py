"""Streaming image folders (ImageNet's layout and transforms) on generated JPEG files."""

from __future__ import annotations

import pytest
import torch
from shared_data import one_thread, write_image_folder  # noqa: F401

from permask.data.loader import get_loaders
from permask.data.stream import FolderLoader, large_images

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("imagenet"))


def test_shares_of_two_ranks_make_the_batches_of_one(folder):
    kw = dict(crop=32, batch_size=10, shuffle=True, augment=False, seed=3, workers=0)
    one = list(FolderLoader(folder / "train", **kw))
    shares = [list(FolderLoader(folder / "train", rank=r, world_size=2, **kw)) for r in (0, 1)]
    assert len(one) == len(shares[0]) == 3  # 24 images, global batch 10: 10, 10, 4
    for b, (x, y) in enumerate(one):
        assert torch.equal(torch.cat([s[b][0] for s in shares]), x)
        assert torch.equal(torch.cat([s[b][1] for s in shares]), y)
        assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32
    assert sorted(torch.cat([y for _, y in one]).tolist()) == sorted([0, 1, 2, 3] * 6)


def test_an_epoch_replays_exactly_with_workers(folder):
    """Augmentation draws come from worker seeds fixed by (seed, epoch)."""
    loader = FolderLoader(folder / "train", crop=24, batch_size=8, shuffle=True, augment=True,
                          workers=2)  # fmt: skip
    loader.set_epoch(1)
    first = list(loader)
    loader.set_epoch(1)
    again = list(loader)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    loader.set_epoch(2)
    other = list(loader)
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(first, other))


def test_get_loaders_streams_large_images_and_keeps_small_ones_in_memory(tmp_path, folder):
    train, test, info = get_loaders(f"imagefolder:{folder}", batch_size=8, crop=32, workers=0)
    assert isinstance(train, FolderLoader) and train.augment and not test.augment
    assert info.num_classes == 4 and info.in_channels == 3
    assert test.example(2).shape == (2, 3, 32, 32) and len(test.labels) == 12  # val/ split
    assert not large_images(folder / "train")  # 40 x 48 px: small
    small, _, _ = get_loaders(f"imagefolder:{folder}", batch_size=8, eval_batch_size=8)
    assert not isinstance(small, FolderLoader) and small.images.shape == (24, 3, 40, 48)
    big = write_image_folder(tmp_path / "big", classes=2, per_class=2, size=(160, 200))
    assert large_images(big / "train")
    train, _, _ = get_loaders(f"imagefolder:{big}", batch_size=4, workers=0)
    assert isinstance(train, FolderLoader) and next(iter(train))[0].shape == (4, 3, 224, 224)
