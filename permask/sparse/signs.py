"""Sign transfer: one model's signs on another's magnitudes, inside a mask.

Two papers find that the signs of a sparse network's weights, more than their magnitudes, tie a
lottery-ticket mask to the init it was found from: "Find A Winning Sign" (Oh, Baik, Lee, ICLR
2025, arXiv 2504.05357) moves a mask with the signs of the trained sparse weights to a random
init; "Sign-In to the Lottery" (Gadhikar, Jacobs, Zhou, Burkholz, NeurIPS 2025, arXiv
2504.12801) shows that the right signs suffice for sparse training from scratch. Earlier, Zhou et
al. (NeurIPS 2019, "Deconstructing Lottery Tickets") kept a ticket trainable with the signs of
its init and other magnitudes. :func:`transfer_signs` is that operation on weights; which
model's signs (A's rewind point, A's trained weights, pi(A)) is the caller's choice
(``permask run --methods``: docs/pipeline.md, "Methods").

>>> import torch
>>> a = {"w": torch.tensor([1.0, -2.0, 3.0, -4.0])}
>>> b = {"w": torch.tensor([-0.5, -0.25, 0.75, 1.5])}
>>> mask = {"w": torch.tensor([True, True, False, True])}
>>> transfer_signs(a, b, mask)["w"]
tensor([ 0.5000, -0.2500,  0.0000, -1.5000])
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["transfer_signs"]


def transfer_signs(
    weights_from: Mapping[str, torch.Tensor],
    weights_to: Mapping[str, torch.Tensor],
    mask: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """``weights_to`` with, for every entry kept by ``mask``, the sign of ``weights_from``.

    Returns a new mapping with every name of ``weights_to`` (e.g. a ``state_dict()``, to load
    with ``load_state_dict``). For each name in ``mask``: inside the mask, the magnitude of
    ``weights_to`` with the sign of ``weights_from`` (exactly: ``copysign``); where the source
    is exactly 0 the target keeps its own sign; outside the mask, 0. Names not in ``mask``
    (biases, norms) are ``weights_to``'s own tensors, unchanged and not copied.

    Signs commute with neuron permutations: with pi from :func:`permask.align`, moving the
    signs of pi(A) equals moving A's signs and permuting after
    (``permute_tensors(transfer_signs(a, b, m), pi, g)`` equals
    ``transfer_signs(permute_tensors(a, pi, g), permute_tensors(b, pi, g), permute_mask(m, pi,
    g))``).
    """
    out = dict(weights_to)
    for name, keep in mask.items():
        if name not in weights_from or name not in weights_to:
            side = "weights_from" if name not in weights_from else "weights_to"
            raise KeyError(
                f"mask entry {name!r} is not in {side}; the mask and both weight mappings must "
                "be of the same architecture (names as in model.state_dict())"
            )
        source, target = weights_from[name], weights_to[name]
        if not source.shape == target.shape == keep.shape:
            raise ValueError(
                f"{name!r}: shapes differ (weights_from {tuple(source.shape)}, weights_to "
                f"{tuple(target.shape)}, mask {tuple(keep.shape)}); all three must be of the "
                "same architecture"
            )
        source = source.to(device=target.device, dtype=target.dtype)
        signed = torch.where(source != 0, target.abs().copysign(source), target)
        out[name] = torch.where(keep.to(device=target.device, dtype=torch.bool), signed, 0)
    return out
