"""Tracing models into permutation-group graphs.

``trace`` captures a model and returns its :class:`PermutationGraph`; rule authors use
``register_rule``, :class:`RuleContext`, :class:`TracedTensor`, :class:`Decline` and
``handles_items`` (docs/graph.md, "Adding a rule"), and check a new rule with
:mod:`permask.testing`.
"""

from .context import RuleContext
from .errors import TraceError
from .graph import FrozenAxis, Group, Member, Observation, PermutationGraph
from .layout import Concat, Fixed, GroupAxis, Product, group_element_map, layout_index
from .orthogonal import Admission, Fold, orthogonal_groups
from .permutation import Permutation, random_permutation
from .query_keys import QueryKeySite, query_key_sites
from .registry import Decline, Rule, TracedTensor, handles_indexes, handles_items, register_rule
from .rope import RopeSite, rope_sites
from .trace import trace
from .turn import head_sites
from .unify import AxisTerm
from .values import ValueSite, value_sites

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
    "Rule",
    "RuleContext",
    "Decline",
    "TracedTensor",
    "AxisTerm",
    "handles_items",
    "handles_indexes",
    "Fixed",
    "GroupAxis",
    "Concat",
    "Product",
    "layout_index",
    "group_element_map",
    "orthogonal_groups",
    "Admission",
    "Fold",
    "rope_sites",
    "RopeSite",
    "value_sites",
    "query_key_sites",
    "QueryKeySite",
    "head_sites",
    "ValueSite",
]
