"""Sparse training toolkit: masks, magnitude pruning, IMP, and an exact masked optimizer.

A mask is ``{parameter name: bool tensor of the parameter's shape}`` (True = kept), named as in
``model.named_parameters()``. Depends only on torch and safetensors.
"""

from .convert import (
    MaskParametrization,
    from_parametrize,
    from_torch_prune,
    to_parametrize,
    to_torch_prune,
)
from .imp import ImpResult, ImpRound, imp, imp_schedule, imp_sparsities
from .io import load_mask, save_mask
from .mask import Mask, Sparsity, apply_mask, magnitude_mask, prunable_parameters, sparsity
from .optimizer import ZERO_PRESERVING, MaskedOptimizer
from .precondition import PRECONDITIONERS, sparseopt_factors
from .signs import transfer_signs

__all__ = [
    "ImpResult",
    "ImpRound",
    "Mask",
    "MaskParametrization",
    "MaskedOptimizer",
    "PRECONDITIONERS",
    "ZERO_PRESERVING",
    "Sparsity",
    "apply_mask",
    "from_parametrize",
    "from_torch_prune",
    "imp",
    "imp_schedule",
    "imp_sparsities",
    "load_mask",
    "magnitude_mask",
    "prunable_parameters",
    "save_mask",
    "sparseopt_factors",
    "sparsity",
    "to_parametrize",
    "to_torch_prune",
    "transfer_signs",
]
