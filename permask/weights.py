"""Read other people's checkpoints: weights and masks from safetensors or torch files.

``read_state_dict(path)`` accepts a safetensors file, or a torch file loaded with
``weights_only=True`` holding a plain state dict, timm's ``{"state_dict": ...}`` (with
``"state_dict_ema"`` beside it; ``ema=True`` takes that), a ``{"model": ...}`` checkpoint (as
``permask run`` writes), or a ``torch.nn.utils.prune``'d model's state dict (``weight_orig`` and
``weight_mask``: the pruned weight is rebuilt). ``module.`` (DDP) and ``_orig_mod.``
(``torch.compile``) prefixes are removed. ``load_weights(model, path)`` puts them into a model,
naming the first missing, unexpected or misshapen entry::

    model = build_model("tv:resnet18")
    load_weights(model, "a.pt")                  # ValueError naming what does not fit
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from permask.sparse import Mask, load_mask

__all__ = ["read_state_dict", "load_weights", "read_mask"]

_WRAPPERS = ("module.", "_orig_mod.")


def read_state_dict(path: str | os.PathLike, ema: bool = False) -> dict[str, torch.Tensor]:
    """The state dict stored in ``path`` (see the module doc); ``ValueError`` if there is none."""
    sd = _unwrap(_load(Path(path), "checkpoint"), ema, Path(path))
    return _pruned_weights_rebuilt(_without_prefixes(sd))


def _load(path: Path, what: str) -> object:
    """What the safetensors or torch file at ``path`` holds (torch: ``weights_only=True``)."""
    if not path.is_file():
        raise ValueError(f"{what} {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # not a torch file, or one that needs arbitrary code
        first = (str(err).strip().splitlines() or [""])[0].split(". ")[0]
        raise ValueError(
            f"cannot read {str(path)!r} as a {what} with weights_only=True ({first}); "
            "save the state dict with torch.save(model.state_dict(), ...) or safetensors"
        ) from None


def _unwrap(obj: object, ema: bool, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = ["state_dict_ema", "model_ema"] if ema else ["state_dict", "model"]
        found = next((k for k in keys if isinstance(obj.get(k), dict)), None)
        if found is None:
            raise ValueError(
                f"{str(path)!r} holds no state dict (keys: {', '.join(map(str, obj))[:200]}); "
                f"expected tensors, or one of {', '.join(keys)}"
            )
        obj = obj[found]
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{str(path)!r} holds no state dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _without_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in sd.items():
        while name.startswith(_WRAPPERS):
            name = name.split(".", 1)[1]
        out[name] = t
    return out


def _pruned_weights_rebuilt(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``x_orig`` and ``x_mask`` (torch.nn.utils.prune) become ``x = x_orig * x_mask``."""
    out = {k: v for k, v in sd.items() if not k.endswith(("_orig", "_mask"))}
    for name in (k[: -len("_orig")] for k in sd if k.endswith("_orig")):
        mask = sd.get(f"{name}_mask")
        out[name] = sd[f"{name}_orig"] * mask if mask is not None else sd[f"{name}_orig"]
    return out


def load_weights(model: nn.Module, path: str | os.PathLike, ema: bool = False) -> nn.Module:
    """Load the checkpoint at ``path`` into ``model`` (strictly); ``ValueError`` naming the first
    entry that does not fit, and the fix."""
    sd = read_state_dict(path, ema)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    extra = [k for k in sd if k not in own]
    where = f"checkpoint {str(path)!r} does not fit the model"
    if missing or extra:
        parts = [
            f"missing {missing[0]!r}" if missing else "",
            f"unexpected {extra[0]!r}" if extra else "",
        ]
        counts = f" ({len(missing)} missing, {len(extra)} unexpected)"
        raise ValueError(
            f"{where}: {' and '.join(p for p in parts if p)}{counts}; is it a checkpoint of this "
            "architecture (and --num-classes)?"
        )
    for k, v in own.items():
        if v.shape != sd[k].shape:
            raise ValueError(
                f"{where}: {k} has shape {tuple(sd[k].shape)} there and {tuple(v.shape)} in the "
                "model; is it a checkpoint of this architecture (and --num-classes)?"
            )
    model.load_state_dict(sd)
    return model


def read_mask(path: str | os.PathLike) -> Mask:
    """A mask from ``save_mask``'s safetensors, or the ``*_mask`` entries of a torch-prune'd
    checkpoint (``conv.weight_mask`` -> ``conv.weight``)."""
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        return load_mask(path)  # bool or 0/1 entries checked there
    sd = _without_prefixes(_unwrap(_load(path, "mask"), False, path))
    masks = {k[: -len("_mask")]: v.bool() for k, v in sd.items() if k.endswith("_mask")}
    if not masks:
        raise ValueError(f"{str(path)!r} has no mask: expected safetensors or '*_mask' entries")
    return masks
