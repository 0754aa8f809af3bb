"""What a matcher gets: :class:`MatchRequest`, the two models and everything ``align`` settled
(graph, device, data) before calling it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..graph import PermutationGraph

__all__ = ["MatchRequest"]


@dataclass
class MatchRequest:
    """``model_a`` and ``model_b`` (unwrapped, not yet on ``device``), their ``graph``, the LAP
    ``solver``, weight matching's ``seed``; for data-driven matchers the loader's ``first``
    batch if ``align`` already read it (to trace on) and the remaining ``batches`` (``None``:
    no loader), ``again``, a function giving the batches once more (``None``: the loader can be
    read once), ``distributed`` (sum statistics over the ranks), the matrix-product
    ``precision``, ``max_stats_memory`` (bytes; :mod:`permask.match.passes`) and the
    statistics' ``stats_dtype``."""

    model_a: nn.Module
    model_b: nn.Module
    graph: PermutationGraph
    device: torch.device
    solver: str = "auto"
    seed: int = 0
    first: Any = None
    batches: Iterator | None = None
    distributed: bool = False
    precision: str | None = None
    again: Callable[[], Iterator] | None = None
    max_stats_memory: int | None = None
    stats_dtype: torch.dtype = torch.float64
