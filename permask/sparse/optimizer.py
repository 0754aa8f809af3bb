"""``MaskedOptimizer``: keep pruned entries exactly zero under any ``torch.optim`` optimizer.

Why this design: grads are masked before the step so that optimizers which mix entries (norms,
trust ratios, orthogonalization) never see pruned gradients; weights and same-shape state are
masked after the step so that any optimizer, whatever its update, keeps exact zeros. All
multiplications are in place (``torch._foreach_mul_``): fused and foreach optimizers hold views of
their state, so state tensors are never replaced.

The post-step pass is skipped for the optimizers in :data:`ZERO_PRESERVING` (exact types), whose
update of an entry is exactly 0 when that entry's grad, weight and state are 0: each moment is a
sum of products with the grad or itself, decay multiplies the weight, and the step is ``0 * x`` or
``0 / (sqrt(0) + eps)``. With masked grads and a masked start (``set_mask``), their pruned entries
stay exactly 0 by themselves, bit for bit as if masked, and the pass is memory traffic for nothing.
Adamax (``max(|g| + eps)``) and Rprop (step sizes start at lr) put non-zero values into pruned
state and are not listed; tests check both sides of the list.

>>> import torch
>>> from permask.sparse import MaskedOptimizer, magnitude_mask
>>> model = torch.nn.Linear(8, 4)
>>> mask = magnitude_mask(model, 0.5)  # {"weight": bool tensor}, half of it False
>>> opt = MaskedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.1), mask, model)
>>> model(torch.randn(16, 8)).square().sum().backward()
>>> opt.step()
>>> bool((model.weight[~mask["weight"]] == 0).all())
True

Step time against dense training and ``torch.nn.utils.prune``, and how many masking passes the
skipped post-step pass saves: docs/benchmarks.md, "Masked optimizer step time".
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .._modules import unwrap
from .mask import Mask, check_entry, unknown_entry
from .precondition import PRECONDITIONERS, sparseopt_factors

#: Optimizer classes (exact types, not subclasses) that keep exact zeros given zero grads.
ZERO_PRESERVING: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.RMSprop,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
    torch.optim.ASGD,
)


def _named_parameters(
    optimizer: torch.optim.Optimizer, model: nn.Module | Iterable[tuple[str, torch.Tensor]] | None
) -> dict[str, torch.Tensor]:
    if isinstance(model, nn.Module):
        return dict(unwrap(model).named_parameters())
    if model is not None:
        return dict(model)
    named = {}
    for group in optimizer.param_groups:
        if "param_names" not in group:
            raise ValueError(
                "Cannot map mask names to parameters: pass the model, as in "
                "MaskedOptimizer(optimizer, mask, model), or build the optimizer from "
                "model.named_parameters()."
            )
        named.update(zip(group["param_names"], group["params"]))
    return named


def _same_mask(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def _factor(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``mask`` as 0/1 in ``like``'s dtype, device and memory layout (channels_last too): equal
    strides keep ``_foreach_mul_`` on its fast path. ``mask`` itself when it already matches."""
    f = mask.to(dtype=like.dtype, device=like.device)
    return f if f.stride() == like.stride() else torch.empty_like(like).copy_(mask)


class MaskedOptimizer(torch.optim.Optimizer):
    """Wrap ``optimizer`` so that entries pruned by ``mask`` stay exactly 0.

    Each :meth:`step` multiplies the grads by the mask, runs the wrapped optimizer, then
    multiplies the weights and every optimizer-state tensor with the parameter's shape (momentum,
    Adam moments, ...) by the mask, in place. Pruned entries are therefore exactly 0 in weights,
    grads and state after every step, for any elementwise or non-elementwise optimizer whose state
    has the parameter's shape (factored states, e.g. Adafactor's, cannot be masked by shape).

    ``post_step_mask`` chooses the pass after the step: ``None`` (default) skips it for the
    optimizers in :data:`ZERO_PRESERVING`, which keep the zeros by themselves; ``True`` always runs
    it, ``False`` never does. Weights written outside the optimizer (``load_state_dict`` on the
    model, manual edits) are re-masked by :meth:`set_mask` (``opt.set_mask(opt.mask)``), or at
    every step with ``post_step_mask=True``.

    Mask names are resolved to parameters through ``model`` (a module, possibly DDP-wrapped or
    compiled, or an iterable of ``(name, parameter)``); without ``model``, through the
    ``param_names`` that torch optimizers record when built from ``model.named_parameters()``.
    The mask is a plain attribute, not a module buffer, so DDP never re-broadcasts it.

    ``precondition="sparseopt"`` multiplies each step's change of every masked weight, per
    output neuron, by SparseOpt's sqrt(1 - s_i) / sqrt(1 - s_avg) (Adnan et al., ICML 2026;
    :mod:`permask.sparse.precondition`), around any optimizer: the whole step is scaled (for
    AdamW its decoupled decay too), so a normalizing optimizer cannot undo it. The weights are
    copied before each step for it. Pruned entries stay exactly 0.

    ``param_groups``, ``state``, ``zero_grad`` and ``add_param_group`` are those of the wrapped
    optimizer, so learning-rate schedulers and ``GradScaler`` (``scaler.step(masked)``) work on
    the wrapper. ``state_dict()`` adds the mask under the key ``"mask"``.
    """

    # GradScaler must unscale grads itself (through param_groups) before calling step().
    _step_supports_amp_scaling = False

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        mask: Mapping[str, torch.Tensor],
        model: nn.Module | Iterable[tuple[str, torch.Tensor]] | None = None,
        *,
        post_step_mask: bool | None = None,
        precondition: str | None = None,
    ) -> None:
        # No super().__init__(): all optimizer state lives in the wrapped optimizer.
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"Expected a torch.optim.Optimizer, got {type(optimizer).__name__}.")
        if isinstance(optimizer, MaskedOptimizer):
            raise TypeError("The optimizer is already a MaskedOptimizer; use set_mask() instead.")
        if not isinstance(mask, Mapping):
            raise TypeError(
                f"mask must be a dict of parameter name -> bool tensor, got "
                f"{type(mask).__name__}; the order is MaskedOptimizer(optimizer, mask, model)."
            )
        if precondition is not None and precondition not in PRECONDITIONERS:
            raise ValueError(
                f"precondition must be None or one of {', '.join(PRECONDITIONERS)}, got "
                f"{precondition!r}"
            )
        self.optimizer = optimizer
        self.precondition = precondition
        if post_step_mask is None:
            post_step_mask = type(optimizer) not in ZERO_PRESERVING
        self.post_step_mask = post_step_mask
        self._model = model if isinstance(model, nn.Module) else None
        self._named = _named_parameters(optimizer, model)
        self._mask: Mask = {}
        self.set_mask(mask)

    # -- proxied optimizer API ---------------------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> dict[torch.Tensor, Any]:
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)
        self._state_of = None

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes not found normally (e.g. hook dicts of the wrapped optimizer).
        if name == "optimizer" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"MaskedOptimizer({self.optimizer!r}, {len(self._mask)} masked tensors)"

    # -- mask --------------------------------------------------------------------------------
    @property
    def mask(self) -> Mask:
        """The current mask (bool tensors on the parameters' devices)."""
        return dict(self._mask)

    def set_mask(self, mask: Mapping[str, torch.Tensor]) -> None:
        """Replace the mask (e.g. for the next IMP round) and apply it to weights, grads, state.

        The mask is copied: editing the caller's tensors later changes nothing here. State that
        does not have its parameter's shape (L-BFGS's flat history, factored second moments)
        cannot be masked; when the mask changes while such state exists, a warning says so
        (re-create such an optimizer for the new mask).
        """
        self._set_mask(mask, state_matches=False)

    @torch.no_grad()
    def _set_mask(self, mask: Mapping[str, torch.Tensor], state_matches: bool) -> None:
        """``set_mask``; ``state_matches``: the state was saved with ``mask`` (no warning)."""
        optimized = {id(p) for group in self.param_groups for p in group["params"]}
        params = []
        for name, m in mask.items():
            p = self._named.get(name)
            if p is None:
                raise unknown_entry(name, self._model, self._named)
            check_entry(name, m, p)
            if id(p) not in optimized:
                raise ValueError(
                    f"Parameter {name!r} is masked but not optimized by the wrapped optimizer; "
                    "add it to the optimizer or drop it from the mask."
                )
            params.append(p)
        new = {n: m.detach().to(p.device, copy=True) for (n, m), p in zip(mask.items(), params)}
        if (
            self._mask
            and not state_matches
            and self._unmaskable_state()
            and not _same_mask(self._mask, new)
        ):
            warnings.warn(
                f"{type(self.optimizer).__name__} holds state that does not have its "
                "parameter's shape (e.g. L-BFGS's flat history) and cannot be masked; it still "
                "describes the old mask. Create a new optimizer for the new mask.",
                stacklevel=2,
            )
        self._mask = new
        self._params = params
        self._factors = [_factor(m, p) for m, p in zip(self._mask.values(), params)]
        self._lifts = self._precondition_lifts()
        self._state_of: tuple[object, int] | None = None  # (state dict, its length) grouped
        self._mask_grads()
        self._mask_weights_and_state()

    def _precondition_lifts(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(parameter, factor - 1)`` of each weight whose step the preconditioner changes
        (layers with equal sparsity in all neurons have factor 1 and are left out)."""
        if self.precondition is None:
            return []
        named = dict(zip(self._mask, self._params))
        lifts = []
        for name, factor in sparseopt_factors(self._mask).items():
            p = named[name]
            lift = (factor - 1).to(dtype=p.dtype, device=p.device)
            if bool(lift.ne(0).any()):
                lifts.append((p, lift))
        return lifts

    def _unmaskable_state(self) -> bool:
        """Whether any state tensor lacks its parameter's shape. All parameters count, masked or
        not: L-BFGS keeps its flat history (over every parameter) under the group's first one."""
        return any(
            isinstance(v, torch.Tensor) and v.dim() and v.shape != p.shape
            for p, state in self.optimizer.state.items()
            for value in state.values()
            for v in (value if isinstance(value, (list, tuple)) else [value])
        )

    def _targets(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Weights and same-shape state tensors with their factors, grouped once and cached.

        Regrouped only when the optimizer's state dict is replaced (load_state_dict) or gains
        entries (state is created lazily on a parameter's first step).
        """
        state = self.optimizer.state
        if (
            self._state_of is None
            or self._state_of[0] is not state
            or self._state_of[1] != len(state)
        ):
            tensors, factors = list(self._params), list(self._factors)
            for p, f in zip(self._params, self._factors):
                cast: dict[tuple, torch.Tensor] = {}
                for value in state.get(p, {}).values():
                    if isinstance(value, torch.Tensor) and value.dim() and value.shape == p.shape:
                        k = (value.dtype, value.device, value.stride())
                        if k not in cast:
                            cast[k] = _factor(f, value)
                        tensors.append(value)
                        factors.append(cast[k])
            self._state_tensors, self._state_factors = tensors, factors
            self._state_of = (state, len(state))
        return self._state_tensors, self._state_factors

    @torch.no_grad()
    def _mask_grads(self) -> None:
        pairs = [(p.grad, f) for p, f in zip(self._params, self._factors) if p.grad is not None]
        if pairs:
            grads, factors = zip(*pairs)
            torch._foreach_mul_(list(grads), list(factors))

    @torch.no_grad()
    def _mask_weights_and_state(self) -> None:
        tensors, factors = self._targets()
        if tensors:
            torch._foreach_mul_(tensors, factors)

    # -- stepping ----------------------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Mask grads, step the wrapped optimizer (its change preconditioned, with
        ``precondition``), then (``post_step_mask``) mask weights and state."""
        before = [p.detach().clone() for p, _ in self._lifts]
        if closure is None:
            self._mask_grads()
            loss = self.optimizer.step()
        else:

            def masked_closure() -> Any:
                loss = closure()
                self._mask_grads()
                return loss

            loss = self.optimizer.step(masked_closure)
        if before:
            self._precondition_step(before)
        if self.post_step_mask:
            self._mask_weights_and_state()
        return loss

    @torch.no_grad()
    def _precondition_step(self, before: list[torch.Tensor]) -> None:
        """new = after + (factor - 1) * (after - before): the step scaled by the factor (exactly
        the unscaled weight where the factor is 1)."""
        for (p, lift), b in zip(self._lifts, before):
            p.add_(b.neg_().add_(p).mul_(lift))

    def clip_grad_norm_(
        self, max_norm: float, norm_type: float = 2.0, **kwargs: Any
    ) -> torch.Tensor:
        """Mask grads, then ``torch.nn.utils.clip_grad_norm_`` over all optimized parameters."""
        self._mask_grads()
        params = [p for group in self.param_groups for p in group["params"]]
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, **kwargs)

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus ``"mask"`` (name -> bool tensor)."""
        return {
            **self.optimizer.state_dict(),
            "mask": {n: m.clone() for n, m in self._mask.items()},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load optimizer state and, if present, the mask; then re-apply the mask."""
        state_dict = dict(state_dict)
        mask = state_dict.pop("mask", None)
        self.optimizer.load_state_dict(state_dict)
        self._set_mask(self._mask if mask is None else mask, state_matches=True)
