"""Conversion from and to the masks of ``torch.nn.utils.prune`` and ``parametrize``.

Both torch layouts store a dense ``weight_orig`` (or ``parametrizations.weight.original``) and
compute ``weight = original * mask`` in every forward. permask masks name the parameter as it is
*without* the reparametrization (``"fc.weight"``), so the same mask works on the plain model.
The parametrize layout is any parametrization with a ``mask`` tensor attribute, e.g.
:class:`MaskParametrization` or ``torch.ao.pruning``'s ``FakeSparsity``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize, prune

from .._modules import unwrap
from .mask import Mask, _join, check_entry


def _module_and_attr(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise KeyError(
            f"Mask entry {name!r}: the model has no submodule {module_name!r}."
        ) from None
    if not isinstance(getattr(module, attr, None), torch.Tensor):
        raise KeyError(f"Mask entry {name!r}: {type(module).__name__} has no tensor {attr!r}.")
    return module, attr


def from_torch_prune(model: nn.Module, remove: bool = True) -> Mask:
    """The mask held by ``torch.nn.utils.prune`` hooks (``<name>_mask`` buffers).

    With ``remove=True`` (default) the pruning is made permanent (``prune.remove``): the model
    gets back plain ``weight`` parameters equal to ``weight_orig * weight_mask``, so the mask's
    names are real parameter names again.
    """
    model = unwrap(model)
    mask = {}
    for module_name, module in model.named_modules():
        hooks = [
            h for h in module._forward_pre_hooks.values() if isinstance(h, prune.BasePruningMethod)
        ]
        for hook in hooks:
            attr = hook._tensor_name
            mask[_join(module_name, attr)] = getattr(module, f"{attr}_mask").detach().bool().clone()
            if remove:
                prune.remove(module, attr)
    return mask


def to_torch_prune(model: nn.Module, mask: Mapping[str, torch.Tensor]) -> None:
    """Install ``mask`` as ``torch.nn.utils.prune`` reparametrizations (``custom_from_mask``)."""
    model = unwrap(model)
    for name, m in mask.items():
        module, attr = _module_and_attr(model, name)
        check_entry(name, m, getattr(module, attr))
        prune.custom_from_mask(module, attr, m.to(getattr(module, attr).device))


class MaskParametrization(nn.Module):
    """Parametrization ``weight = original * mask`` (mask kept as a bool buffer)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.bool().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask


def to_parametrize(model: nn.Module, mask: Mapping[str, torch.Tensor]) -> None:
    """Register a :class:`MaskParametrization` for every mask entry."""
    model = unwrap(model)
    for name, m in mask.items():
        module, attr = _module_and_attr(model, name)
        check_entry(name, m, getattr(module, attr))
        parametrize.register_parametrization(
            module, attr, MaskParametrization(m.to(getattr(module, attr).device))
        )


def from_parametrize(model: nn.Module, remove: bool = True) -> Mask:
    """The mask of every parametrization with a ``mask`` tensor (product if several).

    With ``remove=True`` (default) those tensors' parametrizations are removed with
    ``leave_parametrized=True``: the plain parameter keeps the masked (effective) value. torch
    removes a tensor's parametrizations all together, so a tensor that also has others (e.g.
    weight norm) is refused with ``remove=True`` before anything changes: removing would
    silently drop them.
    """
    model = unwrap(model)
    found = []
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for attr, plist in list(module.parametrizations.items()):
            masks = [p.mask for p in plist if isinstance(getattr(p, "mask", None), torch.Tensor)]
            if not masks:
                continue
            name = _join(module_name, attr)
            others = [
                type(p).__name__
                for p in plist
                if not isinstance(getattr(p, "mask", None), torch.Tensor)
            ]
            if remove and others:
                raise ValueError(
                    f"{name!r} also has the parametrization(s) {', '.join(others)}, which "
                    "removing the mask would drop (torch removes a tensor's parametrizations "
                    "together); call from_parametrize(model, remove=False) and keep them."
                )
            m = masks[0].bool().clone()
            for other in masks[1:]:
                m &= other.bool()
            found.append((module, attr, name, m))
    if remove:
        for module, attr, _, _ in found:
            parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
    return {name: m for _, _, name, m in found}
