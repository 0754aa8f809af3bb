"""Masks: ``{parameter name: bool tensor of the parameter's shape}``, and magnitude pruning.

Names are those of ``model.named_parameters()`` on the unwrapped model (DDP, DataParallel and
``torch.compile`` wrappers are looked through), so a mask never depends on how a model is wrapped.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple, TypeAlias

import torch
from torch import nn

from .._modules import unwrap

Mask: TypeAlias = dict[str, torch.Tensor]
#: A parameter-name filter: a glob pattern (``"layer1.*"``), several patterns, or a predicate.
NameFilter: TypeAlias = str | Iterable[str] | Callable[[str], bool]

PRUNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
SHORTCUT_WORDS = ("shortcut", "downsample")


def _matcher(spec: NameFilter) -> Callable[[str], bool]:
    if callable(spec):
        return spec
    patterns = [spec] if isinstance(spec, str) else list(spec)
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def prunable_parameters(
    model: nn.Module,
    include: NameFilter | None = None,
    exclude: NameFilter | None = None,
    dense_shortcuts: bool = False,
) -> dict[str, nn.Parameter]:
    """Parameters that pruning may touch, in ``named_parameters()`` order.

    Default: the ``weight`` of every Conv1d/2d/3d and Linear module (never norms or biases). A
    weight shared by several modules (a tied LM head and embedding) has one name, its first in
    ``named_parameters()`` (e.g. ``"emb.weight"``); masks and optimizers use that name.
    ``include`` replaces that default by a name filter (glob patterns matched against the full
    parameter name with ``fnmatch``, or a predicate ``name -> bool``); ``exclude`` then removes
    names. ``dense_shortcuts=True`` removes every parameter whose name contains "shortcut" or
    "downsample" (the residual projection convs the paper leaves dense).
    """
    model = unwrap(model)
    if include is None:  # by identity: a tied weight (an LM head sharing the embedding) is
        # found under its first name, the one named_parameters() gives it
        selected = {
            id(m.weight)
            for m in model.modules()
            if isinstance(m, PRUNABLE_TYPES) and isinstance(m.weight, nn.Parameter)
        }
        params = {n: p for n, p in model.named_parameters() if id(p) in selected}
    else:
        keep = _matcher(include)
        params = {n: p for n, p in model.named_parameters() if keep(n)}
    if exclude is not None:
        drop = _matcher(exclude)
        params = {n: p for n, p in params.items() if not drop(n)}
    if dense_shortcuts:
        params = {n: p for n, p in params.items() if not any(w in n for w in SHORTCUT_WORDS)}
    return params


def unknown_entry(
    name: str, model: nn.Module | None, named: Mapping[str, torch.Tensor]
) -> KeyError:
    """The error for a mask entry that names no parameter, with the likely fix: the name a tied
    weight goes by, a wrapper prefix to drop, or a pruning reparametrization still installed."""
    aliases = {}
    if model is not None:
        first = {id(p): n for n, p in named.items()}
        aliases = {
            n: first[id(p)]
            for n, p in unwrap(model).named_parameters(remove_duplicate=False)
            if id(p) in first and n != first[id(p)]
        }
    if name in aliases:
        hint = f" It is tied to {aliases[name]!r}, the name it has in named_parameters(); use that."
    elif f"{name}_orig" in named or _parametrized(name) in named:
        hint = (
            " The model still has a pruning reparametrization on it (torch.nn.utils.prune or "
            "parametrize); make it permanent first: from_torch_prune(model) or "
            "from_parametrize(model)."
        )
    else:
        close = [n for n in named if n.endswith("." + name) or name.endswith("." + n)]
        hint = f" Did you mean {' or '.join(map(repr, close[:3]))}?" if close else ""
    where = type(unwrap(model)).__name__ if model is not None else "the model"
    return KeyError(
        f"Mask entry {name!r} is not a parameter of {where}.{hint} Mask names must be those "
        "of model.named_parameters() on the unwrapped model."
    )


def _parametrized(name: str) -> str:
    """Where ``torch.nn.utils.parametrize`` keeps the original of parameter ``name``."""
    module, _, attr = name.rpartition(".")
    return _join(module, f"parametrizations.{attr}.original")


def _join(module_name: str, tensor_name: str) -> str:
    """A tensor's full name from its module's name (``""`` at the root)."""
    return f"{module_name}.{tensor_name}" if module_name else tensor_name


def resolve(mask: Mapping[str, torch.Tensor], model: nn.Module) -> list[nn.Parameter]:
    """The model's parameters named by ``mask``, in mask order, after validating the mask."""
    named = dict(unwrap(model).named_parameters())
    params = []
    for name, m in mask.items():
        if name not in named:
            raise unknown_entry(name, model, named)
        params.append(named[name])
        check_entry(name, m, named[name])
    return params


def check_entry(name: str, m: torch.Tensor, param: torch.Tensor) -> None:
    """Raise a clear error unless ``m`` is a bool tensor of ``param``'s shape."""
    if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
        kind = m.dtype if isinstance(m, torch.Tensor) else type(m).__name__
        raise TypeError(
            f"Mask entry {name!r} must be a bool tensor, got {kind}. Convert it with "
            "`m.bool()` (for a 0/1 mask) before use."
        )
    if m.shape != param.shape:
        raise ValueError(
            f"Mask entry {name!r} has shape {tuple(m.shape)} but the parameter has shape "
            f"{tuple(param.shape)}. Build the mask from this model (magnitude_mask) or permute "
            "it to this model's layout."
        )


class Sparsity(NamedTuple):
    """Fraction of zeros: ``overall`` over all masked entries, and ``per_layer`` per name."""

    overall: float
    per_layer: dict[str, float]


def sparsity(mask: Mapping[str, torch.Tensor]) -> Sparsity:
    """Fraction of pruned (False) entries, overall and per parameter. Unpacks as a pair."""
    per_layer, zeros, total = {}, 0, 0
    for name, m in mask.items():
        z = int(m.numel() - torch.count_nonzero(m))
        per_layer[name] = z / m.numel() if m.numel() else 0.0
        zeros, total = zeros + z, total + m.numel()
    return Sparsity(zeros / total if total else 0.0, per_layer)


@torch.no_grad()
def apply_mask(model: nn.Module, mask: Mapping[str, torch.Tensor]) -> None:
    """Zero the pruned entries of the model's parameters, in place."""
    params = resolve(mask, model)
    if params:
        torch._foreach_mul_(params, [m.to(p.device) for m, p in zip(mask.values(), params)])


def keep_top(scores: list[torch.Tensor], keep: int) -> list[torch.Tensor]:
    """Bool masks keeping the ``keep`` largest scores over all tensors jointly.

    Exact count; ties at the threshold are broken by position (earlier tensor, then earlier flat
    index wins), so the result is deterministic. Scores must be finite; use -1 for "never keep".
    """
    flat = torch.cat([s.reshape(-1) for s in scores])
    if keep <= 0:
        kept = torch.zeros_like(flat, dtype=torch.bool)
    elif keep >= flat.numel():
        kept = torch.ones_like(flat, dtype=torch.bool)
    else:
        threshold = torch.kthvalue(flat, flat.numel() - keep + 1).values
        kept = flat > threshold
        ties = flat == threshold
        kept |= ties & (torch.cumsum(ties, 0) <= keep - int(kept.sum()))
    return [k.view_as(s) for k, s in zip(kept.split([s.numel() for s in scores]), scores)]


def _scores(
    params: Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor] | None
) -> list[torch.Tensor]:
    scores = []
    device = next(iter(params.values())).device  # rank on the (first) parameters' device
    for name, p in params.items():
        s = p.detach().abs().float().to(device)
        if not torch.isfinite(s).all():
            raise ValueError(f"Parameter {name!r} has non-finite values; cannot rank magnitudes.")
        if mask is not None:
            if name not in mask:
                raise KeyError(
                    f"Parameter {name!r} is prunable but missing from the given mask. Pass the "
                    "same include/exclude/dense_shortcuts as when the mask was built."
                )
            check_entry(name, mask[name], p)
            s = torch.where(mask[name].to(device), s, torch.full_like(s, -1.0))
        scores.append(s)
    return scores


def n_keep(total: int, sparsity: float) -> int:
    """Entries kept at ``sparsity`` out of ``total``: ``total - round(sparsity * total)``."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be a fraction in [0, 1] (0.9 prunes 90%), got {sparsity}.")
    return total - round(sparsity * total)


def mask_from_counts(
    params: Mapping[str, torch.Tensor],
    keep: int | Mapping[str, int],
    mask: Mapping[str, torch.Tensor] | None = None,
) -> Mask:
    """Keep the largest-magnitude entries: ``keep`` in total (global) or per name (per layer).

    With ``mask``, only entries it keeps compete (pruned entries stay pruned).
    """
    scores = _scores(params, mask)
    if mask is not None:
        wanted = {None: keep} if isinstance(keep, int) else keep
        for name, k in wanted.items():
            have = sum(int(mask[n].sum()) for n in (params if name is None else [name]))
            if k > have:
                where = "in total" if name is None else f"of {name!r}"
                raise ValueError(
                    f"Cannot keep {k} entries {where}: the given mask keeps only {have}. "
                    "Pruning only removes weights; ask for a sparsity at least the mask's."
                )
    if isinstance(keep, int):
        kept = keep_top(scores, keep)
    else:
        kept = [keep_top([s], keep[n])[0] for n, s in zip(params, scores)]
    return {n: k.to(p.device) for (n, p), k in zip(params.items(), kept)}


def magnitude_mask(
    model: nn.Module,
    sparsity: float,
    scope: str = "global",
    include: NameFilter | None = None,
    exclude: NameFilter | None = None,
    dense_shortcuts: bool = False,
    mask: Mapping[str, torch.Tensor] | None = None,
) -> Mask:
    """Mask pruning the smallest-magnitude weights (L1) to exactly ``sparsity``.

    ``scope="global"`` ranks all prunable weights together (the paper); ``"layer"`` prunes each
    tensor to ``sparsity``. Kept count is ``n - round(sparsity * n)`` (total or per tensor); ties
    are broken by position, so the mask is deterministic. ``include``/``exclude``/
    ``dense_shortcuts`` choose the prunable parameters (see :func:`prunable_parameters`). With
    ``mask``, only its surviving entries compete, as in a round of IMP.
    """
    params = prunable_parameters(model, include, exclude, dense_shortcuts)
    if not params:
        raise ValueError(
            "No prunable parameters selected. By default only the weights of Conv1d/2d/3d and "
            "Linear modules are pruned; pass include= (glob patterns or a predicate) to choose."
        )
    if scope == "global":
        keep: int | dict[str, int] = n_keep(sum(p.numel() for p in params.values()), sparsity)
    elif scope == "layer":
        keep = {n: n_keep(p.numel(), sparsity) for n, p in params.items()}
    else:
        raise ValueError(f'scope must be "global" or "layer", got {scope!r}.')
    out = mask_from_counts(params, keep, mask)
    if sparsity < 1.0:
        warn_layer_collapse(out, stacklevel=2)
    return out


def warn_layer_collapse(mask: Mapping[str, torch.Tensor], stacklevel: int = 2) -> None:
    """Warn if pruning removed every weight of a tensor (the layer is cut off); ``stacklevel``
    counts from the function that calls this one."""
    emptied = [n for n, m in mask.items() if m.numel() and not m.any()]
    if emptied:
        warnings.warn(
            f"magnitude pruning removed every weight of {', '.join(map(repr, emptied[:3]))}"
            f"{' and others' if len(emptied) > 3 else ''}: the layer is cut off (layer "
            "collapse); prune with scope='layer', or leave it dense with exclude=.",
            stacklevel=stacklevel + 1,
        )
