"""Matching: the permutation that moves model A into model B's basin."""

from .alignment import AlignInfo, align, check_same_architecture
from .lap import available_solvers, solve_lap
from .procrustes import match_rotations, procrustes
from .weight import weight_matching

__all__ = [
    "align",
    "AlignInfo",
    "check_same_architecture",
    "solve_lap",
    "available_solvers",
    "weight_matching",
    "match_rotations",
    "procrustes",
]
