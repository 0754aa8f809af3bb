"""Diversity of an ensemble and loss barriers along linear paths between two models.

Diversity follows Evci et al. (2022), as used in the paper's Table 1: over models' softmax outputs
``p_i`` on one test set, ensemble accuracy is the accuracy of ``mean_i p_i``; disagreement, KL and
JS are means over model pairs of per-example quantities averaged over the test set. KL uses ordered
pairs (it is asymmetric); disagreement and JS are symmetric, so ordered and unordered pairs agree.
Logs are natural (nats). Computed in float64; ``0 log 0 = 0``, and ``log q`` is clamped at
``eps`` only where ``q`` underflowed to 0 while ``p`` did not.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._atomic import atomic_path
from ._batches import batches, call, to_device
from ._modules import check_same_architecture, model_device, unwrap, usable_device
from .graph import PermutationGraph
from .repair import Repair

__all__ = [
    "barrier",
    "ensemble_metrics",
    "evaluate",
    "interpolate",
    "plot_interpolation",
    "predict_proba",
]


def ensemble_metrics(
    probs: Sequence[torch.Tensor], labels: torch.Tensor, eps: float = 1e-12
) -> dict[str, Any]:
    """Accuracy of each model, ensemble accuracy, and pairwise disagreement, KL and JS.

    ``probs`` holds one ``[N, classes]`` tensor of probabilities per model (same examples, same
    order); ``labels`` is ``[N]``. Returns ``accs`` (list), ``acc_mean``, ``acc_std`` (sample std,
    0 for one model), ``ensemble_acc``, ``disagreement``, ``kl``, ``js`` (floats, accuracies as
    fractions; the pairwise ones are ``nan`` for a single model).
    """
    if len(probs) == 0:
        raise ValueError("probs is empty; pass one [N, classes] tensor per model")
    shapes = {tuple(p.shape) for p in probs}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"probs must all be [N, classes] of one shape, got {sorted(shapes)}")
    labels = labels.cpu().long()
    if labels.shape != (probs[0].shape[0],):
        raise ValueError(f"labels must be [{probs[0].shape[0]}], got {tuple(labels.shape)}")
    ps = torch.stack([p.detach().cpu().double() for p in probs])
    accs = [(p.argmax(1) == labels).double().mean().item() for p in ps]
    preds = ps.argmax(2)
    m = len(ps)
    dis, kl, js = [], [], []
    for i in range(m):
        for j in range(m):
            if i == j:
                continue
            kl.append(_kl(ps[i], ps[j], eps).mean().item())
            if i < j:
                dis.append((preds[i] != preds[j]).double().mean().item())
                mid = 0.5 * (ps[i] + ps[j])
                js.append((0.5 * _kl(ps[i], mid, eps) + 0.5 * _kl(ps[j], mid, eps)).mean().item())
    nan = float("nan")
    return {
        "accs": accs,
        "acc_mean": sum(accs) / m,
        "acc_std": torch.tensor(accs).std().item() if m > 1 else 0.0,
        "ensemble_acc": (ps.mean(0).argmax(1) == labels).double().mean().item(),
        "disagreement": sum(dis) / len(dis) if dis else nan,
        "kl": sum(kl) / len(kl) if kl else nan,
        "js": sum(js) / len(js) if js else nan,
    }


def _kl(p: torch.Tensor, q: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-row KL(p || q) = sum p (log p - log q), with 0 log 0 = 0."""
    return (torch.xlogy(p, p) - torch.xlogy(p, q.clamp_min(eps))).sum(1)


@torch.no_grad()
def interpolate(
    model_a: nn.Module,
    model_b: nn.Module,
    loader: Iterable,
    alphas: Sequence[float] | int = 11,
    reset_bn: bool = True,
    bn_loader: Iterable | None = None,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    bn_batches: int | None = None,
    repair: bool = False,
    graph: PermutationGraph | None = None,
) -> dict[str, Any]:
    """Loss and accuracy of ``(1 - alpha) * A + alpha * B`` (state dicts) for each alpha.

    ``alphas`` is a list or a number of evenly spaced points in [0, 1]. With ``reset_bn`` the
    BatchNorm running statistics of every interpolated model (endpoints included) are re-estimated
    by one pass over ``bn_loader`` (default ``loader``) in train mode with ``momentum=None``
    (exact cumulative average), without gradients: interpolated weights make the interpolated
    running statistics meaningless (Jordan et al., REPAIR). ``max_batches`` caps both passes;
    ``bn_batches`` caps the re-estimation alone (a few thousand samples estimate the statistics
    as well as a whole training set: docs/benchmarks.md, "Interpolation stage of `permask run`").
    Non-float buffers (BN batch counters) are taken from A. Models are never modified.

    ``repair=True`` also applies REPAIR (:mod:`permask.repair`) to every interpolated model, on
    the BatchNorm data (``bn_loader``, ``bn_batches``): hidden channels that no BatchNorm
    renormalises get the interpolation of A's and B's means and standard deviations. ``graph``
    (traced from A on the loader's first batch if not given) says which channels those are.

    Returns ``alphas``, ``losses``, ``accs`` (lists), ``barrier`` = max over alpha of
    ``loss(alpha) - ((1 - alpha) loss(0) + alpha loss(1))`` and ``acc_barrier`` = the same for
    accuracy with the sign flipped (the largest drop below the linear path).
    """
    model_a, model_b = unwrap(model_a), unwrap(model_b)
    check_same_architecture(model_a, model_b)
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    if isinstance(alphas, int):
        alphas = torch.linspace(0, 1, alphas).tolist()
    alphas = [float(a) for a in alphas]
    if device is None:
        device = next(iter(sd_a.values())).device
    device = usable_device(device, "interpolate")
    model = copy.deepcopy(model_a).to(device)
    bn_data = bn_loader if bn_loader is not None else loader
    bn_cap = bn_batches if bn_batches is not None else max_batches
    fix = (
        Repair([model_a, model_b], bn_data, graph=graph, max_batches=bn_cap, device=device)
        if repair
        else None
    )
    losses, accs = [], []
    for alpha in alphas:
        mixed = {
            k: torch.lerp(v.double(), sd_b[k].to(v.device).double(), alpha).to(v.dtype)
            if v.is_floating_point()
            else v
            for k, v in sd_a.items()
        }
        model.load_state_dict(mixed)
        if reset_bn:
            _reset_bn(model, bn_data, device, bn_cap)
        scored = fix(model, [1 - alpha, alpha]) if fix is not None else model
        loss, acc = evaluate(scored, loader, device, max_batches)
        losses.append(loss)
        accs.append(acc)
    return {
        "alphas": alphas,
        "losses": losses,
        "accs": accs,
        "barrier": barrier(alphas, losses),
        "acc_barrier": barrier(alphas, [-a for a in accs]),
    }


def barrier(alphas: list[float], values: list[float]) -> float:
    """max over alpha of value(alpha) minus the straight line between the two endpoints.

    The endpoints are the values at the smallest and largest alpha given.
    """
    lo, hi = alphas.index(min(alphas)), alphas.index(max(alphas))
    a0, a1, v0, v1 = alphas[lo], alphas[hi], values[lo], values[hi]
    span = (a1 - a0) or 1.0
    return max(v - (v0 + (a - a0) / span * (v1 - v0)) for a, v in zip(alphas, values))


def _reset_bn(model: nn.Module, loader: Iterable, device, max_batches: int | None) -> None:
    bns = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not bns:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    seen = 0
    for inputs, _ in batches(loader, max_batches):
        call(model, to_device(inputs, device))
        seen += 1
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.eval()
    if seen == 0:
        raise ValueError("the BatchNorm loader yielded no batches")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (fraction) over ``loader`` (at most ``max_batches``), in
    eval mode on ``device`` (default: the model's); the model's mode is restored. Outputs of
    shape ``[..., classes]`` with labels of shape ``[...]`` (a language model's logits and next
    tokens) count every position: the means are per token."""
    loss_sum, correct, seen = 0.0, 0, 0  # device tensors after the first batch: no GPU syncs
    for out, y in _outputs(model, loader, device, max_batches):
        loss_sum += F.cross_entropy(out.float(), y, reduction="sum").double()
        correct += (out.argmax(1) == y).sum()
        seen += len(y)
    if seen == 0:
        raise ValueError("the loader yielded no batches")
    return float(loss_sum) / seen, int(correct) / seen


@torch.no_grad()
def predict_proba(
    model: nn.Module, loader: Iterable, device: torch.device | str | None = None
) -> torch.Tensor:
    """Softmax outputs ``[N, classes]`` (float32, CPU) over ``loader``, in eval mode."""
    outputs = _outputs(model, loader, device, targets=False)
    chunks = [out.float().softmax(1).cpu() for out, _ in outputs]
    if not chunks:
        raise ValueError("the loader yielded no batches")
    return torch.cat(chunks)


def _outputs(
    model: nn.Module,
    loader: Iterable,
    device,
    max_batches: int | None = None,
    targets: bool = True,
):
    """Yield ``(logits, labels)`` on ``device`` (default: the model's) in eval mode, at most
    ``max_batches``, restoring the model's mode afterwards. With ``targets=False`` input-only
    batches pass too (labels ``None``); see :mod:`permask._batches` for what a batch may be."""
    device = usable_device(device, "evaluate") if device is not None else model_device(model)
    was_training = model.training
    model.eval()
    try:
        for inputs, y in batches(loader, max_batches, need_targets=targets):
            out = _logits(call(model, to_device(inputs, device)))
            if y is not None and out.dim() > 2 and out.shape[:-1] == y.shape:
                out, y = out.flatten(0, -2), y.flatten()  # a score per position: tokens
            yield out, None if y is None else y.to(device)
    finally:
        model.train(was_training)


def _logits(out: Any) -> torch.Tensor:
    """A model's class scores: the tensor itself, a Hugging Face output's ``logits``, or the
    first item of a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "logits", None) is not None:
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"the model returned a {type(out).__name__}; evaluation needs class scores")


def plot_interpolation(
    result: dict[str, Any] | dict[str, dict[str, Any]],
    path: str | os.PathLike,
    title: str | None = None,
) -> None:
    """Write a PNG of loss and accuracy against alpha.

    ``result`` is one :func:`interpolate` result, or ``{label: result}`` to overlay several
    curves (e.g. naive vs aligned).
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    curves = {"": result} if "alphas" in result else result
    fig = Figure(figsize=(9, 3.5))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for label, r in curves.items():
        name = f"{label} " if label else ""
        ax_loss.plot(
            r["alphas"], r["losses"], marker="o", label=f"{name}(barrier {r['barrier']:.3f})"
        )
        ax_acc.plot(r["alphas"], [100 * a for a in r["accs"]], marker="o", label=label or None)
    ax_loss.set(xlabel="alpha (0 = A, 1 = B)", ylabel="loss")
    ax_acc.set(xlabel="alpha (0 = A, 1 = B)", ylabel="accuracy (%)")
    ax_loss.legend()
    if len(curves) > 1:
        ax_acc.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
