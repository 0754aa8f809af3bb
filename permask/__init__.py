"""permask: align lottery-ticket masks across random inits via neuron permutations."""

from . import metrics, sparse
from .graph import (
    Permutation,
    PermutationGraph,
    TraceError,
    random_permutation,
    register_rule,
    trace,
)
from .match import align
from .merge import merge
from .permute import permute_mask, permute_model, permute_tensors
from .testing import CheckResult, check

__version__ = "0.1.0"

__all__ = [
    "trace",
    "TraceError",
    "PermutationGraph",
    "Permutation",
    "random_permutation",
    "register_rule",
    "permute_model",
    "permute_mask",
    "permute_tensors",
    "check",
    "CheckResult",
    "align",
    "merge",
    "metrics",
    "sparse",
]
