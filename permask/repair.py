"""REPAIR (Jordan et al., ICLR 2023): undo the variance collapse of interpolated or merged models.

Averaging two aligned networks shrinks their hidden activations: channels that were not
perfectly correlated partly cancel, and the shrinkage compounds with depth. REPAIR rescales and
shifts every channel of the averaged model so that its mean and standard deviation are the
average of the source models' statistics for that channel, then folds the correction into the
layer that produced it (``W[c] *= s[c]``, ``b[c] = (b[c] - mean[c]) * s[c] + goal_mean[c]``).

Which channels: the outputs of every ``nn.Linear``, ``nn.Conv*d`` and Hugging Face ``Conv1D``
(GPT-2's projections, weight ``[in, out]``) whose output axis the traced graph permutes (hidden
units; a frozen output such as the logits is left alone), except

- a layer whose next op is a BatchNorm: its statistics reset
  (``permask.metrics.interpolate(reset_bn=True)``) already renormalises those channels;
- channels that reach the query or key of an attention score
  (:func:`permask.graph.scores.score_channels`): they meet only as dot products inside a
  softmax, so a per-channel correction changes which tokens attend to which instead of
  restoring a statistic. A fused projection split along its channels (GPT-2's ``c_attn``) keeps
  its value part repaired; one reshaped into (3, heads, dim) first (timm's ``qkv``) is left
  out whole, since the walk cannot tell its parts apart without shapes.

A layer without a bias is rescaled only (no new parameters: the result is a plain copy of the
architecture). When no layer qualifies, a warning says so::

    import torch, permask
    from permask.repair import repair

    torch.manual_seed(0)
    nn = torch.nn
    make = lambda: nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    a, b = make(), make()
    data = [torch.randn(64, 4) for _ in range(4)]
    graph = permask.trace(a, data[0])
    a_pi = permask.permute_model(a, permask.align(a, b, data, graph=graph), graph)
    mid = make()
    mid.load_state_dict({k: (v + b.state_dict()[k]) / 2 for k, v in a_pi.state_dict().items()})
    fixed = repair(mid, [a_pi, b], data, graph=graph)  # a repaired copy; mid is unchanged

Statistics are measured in one pass per source and one pass for the target; in the target's
pass every repaired layer already applies its correction with the batch's own statistics (as
REPAIR's reset layers do in train mode), so later layers are measured on corrected inputs.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn

from ._batches import batches, call, first_inputs, to_device
from ._modules import check_same_architecture, model_device, unwrap, usable_device
from .graph import PermutationGraph, trace
from .graph.layout import Fixed
from .graph.scores import score_channels

__all__ = ["repair", "Repair", "repairable_layers"]

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_EPS = 1e-5  # relative: var + eps * goal_var caps the scale at ~316 (a channel that collapsed)


def repairable_layers(model: nn.Module, graph: PermutationGraph) -> list[str]:
    """Names of the layers whose output channels REPAIR corrects (see the module docstring),
    in graph order."""
    return list(repair_channels(model, graph))


def repair_channels(model: nn.Module, graph: PermutationGraph) -> dict[str, torch.Tensor]:
    """Per repairable layer (graph order), a bool tensor over its output channels: True where
    REPAIR corrects the channel (all but those that reach an attention score)."""
    modules = dict(model.named_modules())
    out: dict[str, torch.Tensor] = {}
    for node in graph.fx_graph.nodes:
        name = _layer_of(node)
        module = modules.get(name) if name is not None else None
        if module is None or name in out or not (isinstance(module, _LAYERS) or _is_conv1d(module)):
            continue
        dim = _out_dim(module)
        layouts = graph.tensors.get(f"{name}.weight")
        if layouts is None or isinstance(layouts[dim], Fixed):
            continue
        users = list(node.users)
        if len(users) == 1 and _is_batchnorm(users[0], modules):
            continue
        size = module.weight.shape[dim]
        keep = ~score_channels(node, size, last_dim=not isinstance(module, _CONVS))
        if keep.any():
            out[name] = keep
    return out


def _is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (a linear layer with weight ``[in, out]``), without importing
    transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _out_dim(module: nn.Module) -> int:
    """The dim of the weight that indexes output channels."""
    return 1 if _is_conv1d(module) else 0


def _layer_of(node) -> str | None:
    """The module a node applies: ``call_module``'s target (fx), or the owner of the weight an
    ATen linear/conv reads (``get_attr layer.weight``: the export front end)."""
    if node.op == "call_module":
        return node.target
    name = getattr(node.target, "_opname", None)
    if node.op == "call_function" and name in ("linear", "conv1d", "conv2d", "conv3d", "addmm"):
        at = 2 if name == "addmm" else 1  # addmm(bias, x, weight): HF Conv1D under export
        weight = node.args[at] if len(node.args) > at else None
        if getattr(weight, "op", None) == "get_attr" and weight.target.endswith(".weight"):
            return weight.target.removesuffix(".weight")
    return None


def _is_batchnorm(node, modules: dict) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), nn.modules.batchnorm._BatchNorm)
    return getattr(node.target, "_opname", None) == "batch_norm"


def repair(
    model: nn.Module,
    sources: Sequence[nn.Module],
    loader: Iterable,
    *,
    weights: Sequence[float] | None = None,
    graph: PermutationGraph | None = None,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """A copy of ``model`` whose hidden channels have the ``weights``-average (default uniform)
    of the ``sources``' per-channel means and standard deviations over ``loader``.

    ``sources`` are the models that were averaged, already aligned (e.g. ``permute_model(A, pi)``
    and B; or every model of a merge after alignment to the reference); ``model`` is their
    average. Without ``graph`` the model is traced on the loader's first batch. ``model`` and the
    sources are not modified; the copy is in eval mode on ``device`` (default: model's).
    """
    model = unwrap(model)
    device = usable_device(device if device is not None else model_device(model), "repair")
    return Repair(sources, loader, graph=graph, max_batches=max_batches, device=device)(
        model, weights
    )


class Repair:
    """The sources' statistics, measured once; calling it repairs one average of them (for an
    interpolation path: one call per alpha, ``weights=[1 - alpha, alpha]``)."""

    def __init__(
        self,
        sources: Sequence[nn.Module],
        loader: Iterable,
        *,
        graph: PermutationGraph | None = None,
        max_batches: int | None = None,
        device: torch.device | str | None = None,
    ):
        self.sources = [unwrap(s) for s in sources]
        if not self.sources:
            raise ValueError("repair needs at least one source model")
        for s in self.sources[1:]:
            check_same_architecture(self.sources[0], s)
        first = self.sources[0]
        self.device = usable_device(device if device is not None else model_device(first), "repair")
        self.loader, self.max_batches = loader, max_batches
        if graph is None:
            graph = trace(first, to_device(first_inputs(loader), model_device(first)))
        self.channels = repair_channels(first, graph)
        if not self.channels:
            warnings.warn(
                "REPAIR found no layer to correct: no Linear, Conv or Conv1D layer has a permuted "
                "output that is not followed by BatchNorm or used only as attention query/key; "
                "the repaired model equals the average",
                stacklevel=3,
            )
        self.stats = [self._measure(s) for s in self.sources]

    @property
    def layers(self) -> list[str]:
        """The repaired layers' names (:func:`repairable_layers`)."""
        return list(self.channels)

    def __call__(self, model: nn.Module, weights: Sequence[float] | None = None) -> nn.Module:
        model = unwrap(model)
        check_same_architecture(model, self.sources[0])
        goal = _goal(self.stats, _weights(weights, len(self.sources)))
        out = copy.deepcopy(model).to(self.device)
        found = self._measure(out, correct=goal)
        with torch.no_grad():
            for name, keep in self.channels.items():
                _fold(out.get_submodule(name), found[name], goal[name], keep)
        return out.eval()

    def _measure(self, model: nn.Module, correct: Stats | None = None) -> Stats:
        return _stats(model, self.channels, self.loader, self.device, self.max_batches, correct)


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n or any(w < 0 for w in weights) or abs(sum(weights) - 1) > 1e-6:
        raise ValueError(
            f"weights={weights}: need {n} non-negative weights (one per source) summing to 1"
        )
    return weights


Stats = dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer -> (mean, std) per channel, float64


def _goal(stats: list[Stats], weights: list[float]) -> Stats:
    """The weighted average of the sources' means and of their standard deviations."""
    return {
        k: tuple(sum(w * s[k][i] for w, s in zip(weights, stats)) for i in (0, 1)) for k in stats[0]
    }


@torch.no_grad()
def _stats(
    model: nn.Module,
    layers: dict[str, torch.Tensor],
    loader: Iterable,
    device: torch.device,
    max_batches: int | None,
    correct: Stats | None = None,
) -> Stats:
    """Per-channel mean and std of each layer's output over the data (eval mode). With
    ``correct``, each layer's output is also replaced by itself normalised with the batch's
    statistics and scaled to ``correct[layer]`` (in the channels ``layers[layer]`` marks), so
    later layers see corrected inputs."""
    sums: dict[str, list] = {k: [0, 0.0, 0.0] for k in layers}  # count, sum, sum of squares

    def hook(name: str):
        def fn(module, args, out):
            axis = 1 if isinstance(module, _CONVS) else -1
            x = out.movedim(axis, -1).reshape(-1, out.shape[axis]).double()
            s = sums[name]
            s[0] += len(x)
            s[1] = s[1] + x.sum(0)
            s[2] = s[2] + x.square().sum(0)
            if correct is None:
                return None
            mean, std = x.mean(0), x.std(0, correction=0)
            goal_mean, goal_std = correct[name]
            scale = _scale(std, goal_std)  # as _fold will: no bias, no shift
            y = x * scale if module.bias is None else (x - mean) * scale + goal_mean
            y = torch.where(layers[name].to(y.device), y, x)
            return y.to(out.dtype).reshape(out.movedim(axis, -1).shape).movedim(-1, axis)

        return fn

    model = model if model_device(model) == device else copy.deepcopy(model).to(device)
    handles = [model.get_submodule(k).register_forward_hook(hook(k)) for k in layers]
    was_training = model.training
    model.eval()
    try:
        seen = 0
        for inputs, _ in batches(loader, max_batches):
            call(model, to_device(inputs, device))
            seen += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if seen == 0:
        raise ValueError("the loader yielded no batches")
    out = {}
    for k, (n, s, ss) in sums.items():
        mean = s / n
        out[k] = (mean, (ss / n - mean.square()).clamp_min(0).sqrt())
    return out


def _scale(std: torch.Tensor, goal_std: torch.Tensor) -> torch.Tensor:
    """``goal_std / std``, bounded where ``std`` is far below the goal (scale-free, unlike
    BatchNorm's absolute eps); 0 where the goal itself is constant."""
    return goal_std / (std.square() + _EPS * goal_std.square() + 1e-300).sqrt()


def _fold(layer: nn.Module, found: tuple, goal: tuple, keep: torch.Tensor) -> None:
    """Fold ``y' = (y - found_mean) * goal_std / found_std + goal_mean`` into the layer, in the
    channels ``keep`` marks (the others unchanged)."""
    (mean, std), (goal_mean, goal_std) = found, goal
    keep = keep.to(std.device)
    scale = torch.where(keep, _scale(std, goal_std), 1.0)
    w, dim = layer.weight, _out_dim(layer)
    shape = [1] * w.dim()
    shape[dim] = -1
    w.copy_((w.double() * scale.reshape(shape)).to(w.dtype))
    if layer.bias is not None:
        b = layer.bias
        new = (b.double() - mean) * scale + goal_mean
        b.copy_(torch.where(keep, new, b.double()).to(b.dtype))
