"""Text for language models: ``--data text:FILE`` (docs/cli.md, "Text data").

A plain text file, or a ``.jsonl`` file with one JSON object per line whose ``"text"`` field is
a document (documents joined by a newline). It becomes token ids with the tokenizer given (a
Hugging Face tokenizer: anything with ``encode``), else its UTF-8 bytes (ids 0-255), then
consecutive windows of ``seq_len + 1`` tokens, each overlapping the next by one token: a
window's first ``seq_len`` tokens are the inputs and its last ``seq_len`` the next-token
targets. The first 90% of the windows are for training (matching, REPAIR), the rest for
evaluation, in order::

    >>> train, test = text_batches("pi.txt", seq_len=4, batch_size=2)  # doctest: +SKIP
    >>> x, y = next(iter(train)); bool((x[:, 1:] == y[:, :-1]).all())  # doctest: +SKIP
    True
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .datasets import DataNotFoundError

__all__ = ["TextBatches", "read_text", "text_batches", "token_ids"]

TRAIN_FRACTION = 0.9


class TextBatches:
    """``(inputs, targets)`` batches of token windows (``[B, seq_len]`` each), the same every
    pass; ``len()`` is the number of batches."""

    def __init__(self, windows: torch.Tensor, batch_size: int, device: Any = "cpu") -> None:
        self.windows, self.batch_size, self.device = windows, batch_size, device

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.windows), self.batch_size):
            w = self.windows[start : start + self.batch_size].to(self.device)
            yield w[:, :-1], w[:, 1:]

    def __len__(self) -> int:
        return -(-len(self.windows) // self.batch_size)

    @property
    def tokens(self) -> int:
        """Target tokens per pass (what a loss is averaged over)."""
        return self.windows[:, 1:].numel()


def read_text(path: str | os.PathLike, field: str = "text") -> str:
    """The text of a plain file, or of the ``field`` of each line of a ``.jsonl`` file."""
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"text file {str(path)!r} does not exist; give --data text:FILE")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix != ".jsonl":
        return raw
    docs = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path} line {number} is not JSON; a .jsonl file holds one "
                             "JSON object per line") from None  # fmt: skip
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise ValueError(f"{path} line {number} has no {field!r} string field; each line "
                             f"needs one (e.g. {{\"{field}\": \"...\"}})")  # fmt: skip
        docs.append(record[field])
    return "\n".join(docs)


def token_ids(text: str, tokenizer: Any = None) -> torch.Tensor:
    """Token ids of ``text`` (int64): the tokenizer's without special tokens, else UTF-8 bytes."""
    if tokenizer is None:
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    return torch.tensor(tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)


def text_batches(
    path: str | os.PathLike,
    seq_len: int,
    batch_size: int,
    tokenizer: Any = None,
    vocab_size: int | None = None,
    device: Any = "cpu",
) -> tuple[TextBatches, TextBatches]:
    """The training and evaluation batches of the text at ``path`` (see the module doc);
    ``ValueError`` naming the fix when the text is too short or its ids exceed ``vocab_size``."""
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"--seq-len and the batch size must be >= 1, got {seq_len}, {batch_size}")
    ids = token_ids(read_text(path), tokenizer)
    count = (len(ids) - 1) // seq_len
    if count < 2:
        raise ValueError(f"{path} has {len(ids)} tokens, too few for two windows of --seq-len "
                         f"{seq_len}; give a longer text or a shorter --seq-len")  # fmt: skip
    if vocab_size is not None and int(ids.max()) >= vocab_size:
        how = "its tokenizer" if tokenizer is not None else "bytes (no tokenizer in the folder)"
        raise ValueError(f"{path} read as {how} has token id {int(ids.max())}, beyond the "
                         f"model's vocabulary of {vocab_size}; give a folder with the model's "
                         "tokenizer")  # fmt: skip
    windows = ids[: count * seq_len + 1].unfold(0, seq_len + 1, seq_len)
    split = min(max(1, int(TRAIN_FRACTION * count)), count - 1)
    return (TextBatches(windows[:split], batch_size, device),
            TextBatches(windows[split:], batch_size, device))  # fmt: skip
