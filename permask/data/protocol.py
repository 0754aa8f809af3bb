"""What the trainer, ``align`` and the pipeline need of a loader: :class:`Loader`.

:class:`~permask.data.loader.TensorLoader` (images in memory) and
:class:`~permask.data.stream.FolderLoader` (an image folder streamed from disk) both satisfy it;
so does any class of yours with these members. A changed loader is a copy
(``loader.replace(batch_size=512)``), so the run's own loader is never mutated by a stage.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch

__all__ = ["Loader", "SETTINGS", "replaced"]

L = TypeVar("L")

# The settings a copy may change (the data itself, its device and transforms stay).
SETTINGS = ("batch_size", "shuffle", "augment", "seed", "max_batches", "rank", "world_size")


@runtime_checkable
class Loader(Protocol):
    """``(inputs, labels)`` batches, epoch by epoch: ``iter()`` plays epoch ``epoch`` then
    advances it, ``set_epoch`` pins it (a resumed training replays identical batches), ``len()``
    is the batches per epoch, ``labels`` every label in order (evaluation), ``example(n)`` the
    first ``n`` inputs as a model sees them (tracing), ``replace(**settings)`` a copy with other
    :data:`SETTINGS` sharing the data."""

    batch_size: int
    labels: torch.Tensor

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...
    def __len__(self) -> int: ...
    def set_epoch(self, epoch: int) -> None: ...
    def example(self, n: int = 2) -> torch.Tensor: ...
    def replace(self: L, **settings: Any) -> L: ...


def replaced(loader: L, settings: dict[str, Any]) -> L:
    """A shallow copy of ``loader`` (the data shared) with ``settings`` changed; ``ValueError``
    for a name outside :data:`SETTINGS`."""
    import copy

    unknown = sorted(set(settings) - {n for n in SETTINGS if hasattr(loader, n)})
    if unknown:
        raise ValueError(f"cannot change {', '.join(unknown)} of a loader; these can: "
                         f"{', '.join(SETTINGS)}")  # fmt: skip
    out = copy.copy(loader)
    for name, value in settings.items():
        setattr(out, name, value)
    if out.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {out.batch_size}")
    if hasattr(out, "rank") and not 0 <= out.rank < out.world_size:
        raise ValueError(f"need 0 <= rank < world_size, got {out.rank} and {out.world_size}")
    return out
