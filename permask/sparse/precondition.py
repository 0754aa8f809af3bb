"""SparseOpt's per-neuron preconditioner: :func:`sparseopt_factors`.

Adnan et al. ("SparseOpt: Addressing Normalization-induced Gradient Skew in Sparse Training",
ICML 2026, arXiv 2605.27541) show that a BatchNorm after a sparse layer scales the gradients of
the kept weights of neuron i, which has sparsity s_i, by about (1 - s_i)^(-1/2): the sparsest
neurons get the largest steps (3.2x at 90%, 5.8x at 97%). SparseOpt multiplies each neuron's
update by

    sqrt(1 - s_i) / sqrt(1 - s_avg),    s_avg = the mean of s_i over the layer's neurons,

which undoes the skew and keeps the layer's mean step size. For SGD that is the paper's
update theta <- theta - lr / sqrt(1 - s_avg) * D g with D = diag(sqrt(1 - s_i)).

Choices where the paper leaves them open (docs/pipeline.md, "SparseOpt"):

- A neuron is an output unit: a row of the weight along dim 0 (``nn.Linear``'s out_features,
  a conv's out_channels). Layouts with outputs on another dim (Hugging Face ``Conv1D``) are not
  handled: pass such layers' names out of the mask given to ``precondition``.
- Every weight of the mask with two or more dims is preconditioned, followed by a norm or not:
  the library does not see the model's graph here. In a layer without a normalization after it
  the skew does not arise, and the factors then slow the sparsest neurons relative to the
  others; docs/results.md measures it on MLPs without norms.
- 1-D entries (biases, norm weights, if masked) and layers whose neurons all have the same
  sparsity get factor 1 exactly (the plain optimizer's update, bit for bit).
- A fully pruned layer gets factor 0: it has no kept weight to update.

>>> import torch
>>> mask = {"w": torch.tensor([[True, True, True, True], [True, False, False, False]])}
>>> sparseopt_factors(mask)["w"].flatten().tolist()  # s = (0, 0.75), s_avg = 0.375
[1.2649110640673518, 0.6324555320336759]
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["PRECONDITIONERS", "sparseopt_factors"]

#: Names accepted by ``MaskedOptimizer(..., precondition=...)`` and ``--sparse-precondition``.
PRECONDITIONERS = ("sparseopt",)


def sparseopt_factors(mask: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per entry of ``mask`` with two or more dims: the factor of each output neuron's update,
    sqrt(1 - s_i) / sqrt(1 - s_avg), shaped ``(out, 1, ...)`` to broadcast against the weight
    (float64, on the mask's device). Entries with fewer dims are left out (factor 1)."""
    factors = {}
    for name, keep in mask.items():
        if keep.dim() < 2:
            continue
        kept = keep.reshape(keep.shape[0], -1).sum(dim=1, dtype=torch.int64)
        total = int(kept.sum())
        shape = (-1,) + (1,) * (keep.dim() - 1)
        if total == 0:
            factors[name] = torch.zeros(kept.shape, dtype=torch.float64, device=keep.device)
        else:
            # (1 - s_i) / (1 - s_avg) = kept_i * neurons / total: the fan-in cancels, and equal
            # sparsities give exactly 1 (integers until the division)
            ratio = (kept * kept.numel()).to(torch.float64) / total
            factors[name] = ratio.sqrt()
        factors[name] = factors[name].reshape(shape)
    return factors
