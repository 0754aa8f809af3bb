"""What an alignment did: :class:`AlignInfo`, returned by ``align(..., return_info=True)``."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["AlignInfo"]


@dataclass
class AlignInfo:
    """What an alignment did.

    ``samples``: the examples the data had (rows of its batches: images, or sequences);
    ``observations``: the values each activation correlation averages over, at the least
    observed point (examples x positions: a sequence's tokens, an image's pixels for a conv;
    activation). ``points``: group -> fx nodes observed (activation); ``unmatched``: groups that
    no usable activation shows, matched by weights instead; ``stats_bytes``: float64 statistics
    memory (activation; of the largest pass); ``passes``: passes over the data (activation: more
    than 1 under ``max_stats_memory``, :mod:`permask.match.passes`); ``pass_seconds``: the
    passes over the data (both forwards and the
    statistics; the rest of ``seconds`` is correlations and assignment, independent of the data
    size); ``objective`` and ``iterations``: sum <W_B, P W_A> and coordinate-descent sweeps
    (weight); ``constant``: unit (its groups joined by " x ") -> how many of A's and of B's
    elements were constant on the data (e.g. ReLUs that never fired), only units that had some
    (activation). The data gives such elements no order: the pairs with a constant element are
    re-matched among themselves by weight matching's scores (pairs of live elements stay the
    data's; inside blocks x within, a block or within element is constant where it is in every
    block). Logged as a warning; more or other data orders them by activations. ``margins``: per
    group, how sure its assignment is (:func:`permask.match.assign.margin`: positive certifies
    the unique optimum; for a group in a nesting, blocks x within, and in weight matching for
    every group, the optimum with the other groups held at their assignments:
    :func:`permask.match.assign.conditional`); ``ties``: groups with elements whose best
    partners tie, and how many (logged as a warning unless constant channels explain them).
    """

    method: str
    seconds: float
    groups: int
    batches: int = 0
    samples: int = 0
    stats_bytes: int = 0
    objective: float | None = None
    iterations: int | None = None
    points: dict[str, list[str]] = field(default_factory=dict)
    unmatched: tuple[str, ...] = ()
    pass_seconds: float = 0.0
    constant: dict[str, tuple[int, int]] = field(default_factory=dict)
    margins: dict[str, float] = field(default_factory=dict)
    ties: dict[str, int] = field(default_factory=dict)
    observations: int = 0
    passes: int = 1
