"""Tracing models into permutation-group graphs."""

from .graph import FrozenAxis, Group, Member, Observation, PermutationGraph
from .layout import Concat, Fixed, GroupAxis, Product, layout_index
from .permutation import Permutation, random_permutation
from .registry import Decline, TVal, register_rule
from .trace import TraceError, trace

__all__ = [
    "trace",
    "TraceError",
    "PermutationGraph",
    "Group",
    "Member",
    "Observation",
    "FrozenAxis",
    "Permutation",
    "random_permutation",
    "register_rule",
    "Decline",
    "TVal",
    "Fixed",
    "GroupAxis",
    "Concat",
    "Product",
    "layout_index",
]
