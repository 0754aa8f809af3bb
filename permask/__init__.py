"""permask: align lottery-ticket masks across random inits via neuron permutations."""

import torch.distributed

if torch.distributed.is_available():
    # torch.distributed.nn binds the default process group as a default argument when first
    # imported, which torch does lazily (meta kernels, torch.compile, FSDP; timm and torchvision
    # import it too). Imported after init_process_group, it keeps the group alive past
    # destroy_process_group, and gloo's threads then race the interpreter's exit (a rare SIGABRT
    # after all work is done). Importing it now (cheap), before a user's or `permask run`'s
    # init_process_group, binds nothing (docs/alignment.md, "Several processes (torchrun)").
    import torch.distributed.nn  # noqa: F401

from . import metrics, sparse
from .graph import (
    Permutation,
    PermutationGraph,
    TraceError,
    orthogonal_groups,
    query_key_sites,
    random_permutation,
    register_rule,
    rope_sites,
    trace,
    value_sites,
)
from .match import align, match_rotations
from .merging import merge
from .permute import permute_mask, permute_model, permute_tensors
from .rotate import fold_norms, random_rotation, rotate_model, rotate_tensors, untie_weights
from .sparse import transfer_signs
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
    "orthogonal_groups",
    "rope_sites",
    "value_sites",
    "query_key_sites",
    "fold_norms",
    "match_rotations",
    "rotate_model",
    "rotate_tensors",
    "random_rotation",
    "untie_weights",
    "transfer_signs",
    "check",
    "CheckResult",
    "align",
    "merge",
    "metrics",
    "sparse",
]
