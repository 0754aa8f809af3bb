"""Training and evaluation loops with atomic, exactly resumable epoch checkpoints.

A checkpoint (``last.pt``, rewritten every ``checkpoint_every`` epochs) holds the model,
optimizer and scheduler state dicts, the number of completed epochs and the torch RNG states;
batches come from a loader with ``set_epoch`` (see :class:`TensorLoader`), so the data order is a
function of the epoch. Re-running :func:`train` with the same arguments and directory therefore
continues an interrupted run (even one killed with SIGKILL) to bit-identical weights (on CPU;
on CUDA with ``CUBLAS_WORKSPACE_CONFIG=:4096:8``, and for conv nets deterministic algorithms,
which the caller sets: docs/pipeline.md). Everything
in a checkpoint is a tensor or a plain Python value, so it loads with ``weights_only=True``.

Rewind points: ``keep_epochs=(k, ...)`` also keeps ``epoch_<k>.pt``, the state after ``k``
completed epochs (``k = start_epoch`` is the state before any training, e.g. the init for k=0).
Note the paper's code saved its "epoch k" checkpoint after k+1 epochs; here k means k epochs.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from permask._atomic import atomic_save
from permask._modules import model_device
from permask.experiment.compiled import COMPILE, CompiledForward
from permask.experiment.distributed import World, current_world
from permask.metrics import evaluate, predict_proba  # re-exported: evaluation loops
from permask.sparse import MaskedOptimizer

__all__ = [
    "TrainResult",
    "checkpoint_path",
    "evaluate",
    "load_checkpoint",
    "make_optimizer",
    "make_scheduler",
    "predict_proba",
    "train",
]


def bars_shown(progress: bool) -> bool:
    """Progress bars only where a person watches them: ``progress`` on and stderr a terminal
    (a log file or pipe gets the few plain lines per stage, not the bars' carriage returns)."""
    return progress and sys.stderr.isatty()


OptimizerFactory = Callable[[Iterable[tuple[str, nn.Parameter]]], torch.optim.Optimizer]
SCHEDULES = ("cosine", "step", "constant")
AMP = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # autocast dtypes
STEP_MILESTONES = (1 / 3, 2 / 3, 8 / 9)  # of the schedule: epochs 30, 60, 80 of 90 (ImageNet)


@dataclass
class TrainResult:
    """What :func:`train` did: per-epoch history (all epochs, resumed ones included)."""

    epochs: int
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int | None = None  # completed epochs found in checkpoint_dir, if any


def checkpoint_path(checkpoint_dir: str | os.PathLike, epoch: int | None = None) -> Path:
    """``<dir>/last.pt``, or the rewind point ``<dir>/epoch_<epoch>.pt``."""
    name = "last.pt" if epoch is None else f"epoch_{epoch}.pt"
    return Path(checkpoint_dir) / name


def load_checkpoint(
    path: str | os.PathLike, model: nn.Module | None = None, map_location: Any = "cpu"
) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; if ``model`` is given, load its weights."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if model is not None:
        model.load_state_dict(ckpt["model"])
    return ckpt


def make_optimizer(
    spec: str | OptimizerFactory,
    model: nn.Module,
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """``"sgd"`` (Nesterov off), ``"adam"``, ``"adamw"``, or ``factory(named_parameters)``.

    Built from ``model.named_parameters()`` so the optimizer records parameter names. Weight decay
    applies to all parameters, as in the paper.
    """
    named = list(model.named_parameters())
    if callable(spec):
        return spec(named)
    if spec == "sgd":
        return torch.optim.SGD(named, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if spec in ("adam", "adamw"):
        cls = torch.optim.Adam if spec == "adam" else torch.optim.AdamW
        return cls(named, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {spec!r}; choose sgd, adam, adamw or pass a factory")


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: str,
    total_steps: int,
    warmup_steps: int = 0,
    start_step: int = 0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step learning-rate factor: linear warm-up, then ``cosine`` to 0 at ``total_steps``,
    ``step`` (x0.1 at 1/3, 2/3 and 8/9 of ``total_steps``: epochs 30, 60 and 80 of 90, the
    ImageNet recipe) or ``constant``.

    The schedule starts at step ``start_step`` (continuing a schedule after a rewind).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")

    def factor(step: int) -> float:
        step += start_step
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        if schedule == "step":
            return 0.1 ** sum(step >= round(f * total_steps) for f in STEP_MILESTONES)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train(
    model: nn.Module,
    loader: Iterable,
    *,
    epochs: int,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    optimizer: str | OptimizerFactory = "sgd",
    schedule: str = "cosine",
    warmup_epochs: int = 0,
    start_epoch: int = 0,
    mask: Mapping[str, torch.Tensor] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 1,
    keep_epochs: Iterable[int] = (),
    device: torch.device | str | None = None,
    progress: bool = True,
    desc: str = "train",
    distributed: bool = False,
    amp: str = "off",
    sync_bn: bool = False,
    precondition: str | None = None,
    compile: str = "off",
) -> TrainResult:
    """Train ``model`` in place with cross-entropy for epochs ``start_epoch .. epochs - 1``.

    The schedule spans ``epochs`` epochs and starts at ``start_epoch`` (learning-rate rewinding
    continues a schedule; a fresh schedule is ``start_epoch=0``). With ``mask`` the optimizer is
    wrapped in :class:`permask.sparse.MaskedOptimizer`, so pruned weights stay exactly 0, its
    steps preconditioned by ``precondition`` (e.g. ``"sparseopt"``; needs ``mask``). With
    ``checkpoint_dir`` training resumes from ``last.pt`` if present (returning at once when it is
    complete) and keeps ``epoch_<k>.pt`` for every ``k`` in ``keep_epochs``.

    ``amp="bf16"`` or ``"fp16"`` runs forward and loss under ``torch.autocast`` (weights stay
    float32); fp16 adds a ``GradScaler`` whose state is checkpointed. A step the scaler skips
    (inf/NaN gradients) changes nothing, so pruned weights stay exactly 0 in every mode.

    ``compile`` (:data:`permask.experiment.compiled.COMPILE`: ``"inductor"``, ...) runs the
    training forward and backward under ``torch.compile``, eager again after a compile failure
    (one warning); evaluation stays eager. It is recorded in the checkpoints when not ``"off"``.

    ``distributed=True`` (every rank of an initialized ``torch.distributed`` group calls it, each
    with its share of every batch, e.g. a :class:`TensorLoader` with ``rank``/``world_size``):
    the model trains under ``DistributedDataParallel`` with the loss of the *global* batch (sums
    over the ranks' shares divided by the global count, exact also for an uneven last batch),
    so N processes take the steps of one. Rank 0 writes the checkpoints and every rank reads them
    to resume; after each epoch rank 0's buffers (BatchNorm statistics) are broadcast and the
    parameters are checked to be bit-identical on every rank. ``sync_bn=True`` (CUDA only: torch
    has no CPU kernel for it) normalises BatchNorm over the global batch during training
    (``nn.SyncBatchNorm`` sharing the model's parameters and buffers); ``model`` keeps its own
    BatchNorm modules afterwards.
    """
    _check_train_arguments(start_epoch, epochs, checkpoint_every, amp, compile)
    if precondition is not None and mask is None:
        raise ValueError(f"precondition={precondition!r} needs a mask (it scales sparse steps)")
    device = _training_device(model, device, sync_bn)
    model.to(device)
    steps = len(loader)  # type: ignore[arg-type]
    opt = make_optimizer(optimizer, model, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if mask is not None:
        opt = MaskedOptimizer(opt, mask, model, precondition=precondition)
    sched = make_scheduler(
        opt, schedule, epochs * steps, warmup_epochs * steps, start_step=start_epoch * steps
    )
    meta = _checkpoint_meta(epochs, start_epoch, steps, lr, schedule, amp, compile)
    world = current_world(distributed)
    with _sync_batchnorm(model, sync_bn and world.active):
        loop = _Loop(model, opt, sched, device, world, amp, meta, compile)
        result = _run_epochs(loop, loader, start_epoch, epochs, checkpoint_dir, checkpoint_every,
                             set(keep_epochs), progress, desc)  # fmt: skip
    world.barrier()  # the checkpoints are on disk for every rank
    return result


def _check_train_arguments(
    start_epoch: int, epochs: int, checkpoint_every: int, amp: str, compile: str
) -> None:
    """Raise ``ValueError`` for :func:`train` arguments that cannot run (nothing touched yet)."""
    if not 0 <= start_epoch <= epochs:
        raise ValueError(f"need 0 <= start_epoch <= epochs, got {start_epoch} and {epochs}")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    if amp not in AMP:
        raise ValueError(f"amp must be one of {', '.join(AMP)}, got {amp!r}")
    if compile not in COMPILE:
        raise ValueError(f"compile must be one of {', '.join(COMPILE)}, got {compile!r}")


def _training_device(
    model: nn.Module, device: torch.device | str | None, sync_bn: bool
) -> torch.device:
    """``device``, or the model's when None; ``sync_bn`` needs a CUDA device."""
    device = torch.device(device) if device is not None else model_device(model)
    if sync_bn and device.type != "cuda":
        raise ValueError(f"sync_bn needs CUDA devices (torch's SyncBatchNorm), got {device}")
    return device


def _checkpoint_meta(
    epochs: int, start_epoch: int, steps: int, lr: float, schedule: str, amp: str, compile: str
) -> dict[str, Any]:
    """The settings a checkpoint records; resuming with others is an error (:func:`_check_meta`).
    ``amp`` and ``compile`` are recorded only when on, so checkpoints from before they existed
    still resume."""
    meta = {"epochs": epochs, "start_epoch": start_epoch, "steps_per_epoch": steps, "lr": lr}
    meta |= {"schedule": schedule} | ({"amp": amp} if amp != "off" else {})  # off: as before
    return meta | ({"compile": compile} if compile != "off" else {})


def _run_epochs(
    loop: _Loop,
    loader: Iterable,
    start_epoch: int,
    epochs: int,
    checkpoint_dir: str | os.PathLike | None,
    checkpoint_every: int,
    keep_epochs: set[int],
    progress: bool,
    desc: str,
) -> TrainResult:
    """Epochs ``start_epoch .. epochs - 1`` of ``loop``, resumed from ``last.pt`` if there, with
    a checkpoint every ``checkpoint_every`` epochs, after the last, and at each rewind point."""
    result = TrainResult(epochs)
    epoch = start_epoch
    last = checkpoint_path(checkpoint_dir) if checkpoint_dir is not None else None
    if last is not None and last.is_file():
        epoch = result.resumed_from = loop.resume(last, result)
    elif last is not None and start_epoch in keep_epochs:
        loop.save(last.parent, start_epoch, result, rewind=True)
    while epoch < epochs:
        result.history.append(loop.epoch(loader, epoch, epochs, desc, progress))
        epoch += 1
        due = epoch % checkpoint_every == 0 or epoch == epochs or epoch in keep_epochs
        if last is not None and due:
            loop.save(last.parent, epoch, result, rewind=epoch in keep_epochs)
    return result


@contextmanager
def _sync_batchnorm(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Inside: the model's BatchNorm modules are ``nn.SyncBatchNorm``s sharing their parameters
    and buffers (torch's ``convert_sync_batchnorm``); after: the original modules again."""
    if not enabled:
        yield
        return
    originals = {
        name: m
        for name, m in model.named_modules()
        if name and isinstance(m, nn.modules.batchnorm._BatchNorm)
    }
    nn.SyncBatchNorm.convert_sync_batchnorm(model)
    try:
        yield
    finally:
        for name, module in originals.items():
            model.set_submodule(name, module)


class _Loop:
    """One training run's moving parts: epochs, steps, checkpoints (written by rank 0)."""

    def __init__(
        self, model, opt, sched, device, world: World, amp: str, meta: dict, compile: str = "off"
    ) -> None:
        self.model, self.opt, self.sched, self.meta = model, opt, sched, meta
        self.device, self.world, self.dtype = device, world, AMP[amp]
        self.scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
        self.net = model
        if world.active:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device] if device.type == "cuda" else None
            self.net = DistributedDataParallel(model, device_ids=ids, broadcast_buffers=True)
        self.forward = CompiledForward(self.net, compile)

    def epoch(self, loader, epoch: int, epochs: int, desc: str, progress: bool) -> dict:
        """Train one epoch; its loss and accuracy over the global batches (one host sync)."""
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        self.model.train()
        start = time.perf_counter()
        sums = torch.zeros(2, device=self.device, dtype=torch.float64)  # loss, correct
        seen = 0  # on the host: the batch sizes are known there
        lr = self.opt.param_groups[0]["lr"]
        show = bars_shown(progress) and self.world.main
        for x, y in tqdm(
            loader, desc=f"{desc} {epoch + 1}/{epochs}", leave=False, disable=not show
        ):
            sums += self.step(
                x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            )
            seen += len(y)
        sums = torch.cat([sums, sums.new_tensor([seen])])
        if self.world.active:
            dist.all_reduce(sums)
            self.world.broadcast_buffers(self.model)  # rank 0's BatchNorm statistics
            where = f"{desc}: the model after epoch {epoch + 1}"
            self.world.check_same(where, dict(self.model.named_parameters()))
        loss, correct, seen = sums.tolist()
        mean_loss = loss / max(seen, 1)
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"{desc}: training loss is {mean_loss} in epoch {epoch + 1}")
        seconds = time.perf_counter() - start
        return {"epoch": epoch + 1, "loss": mean_loss, "acc": correct / max(seen, 1), "lr": lr,
                "seconds": seconds}  # fmt: skip

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step on this rank's share; returns (loss sum, correct) on the device."""
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            out = self.forward(x)
            if self.world.active:  # the global batch's mean; DDP averages over ranks: * size
                total = torch.tensor(float(len(y)), device=self.device)
                dist.all_reduce(total)
                loss_sum = F.cross_entropy(out.float(), y, reduction="sum")
                loss = loss_sum * (self.world.size / total)
            else:
                loss = F.cross_entropy(out.float(), y)
                loss_sum = loss * len(y)
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)  # skipped on inf/NaN gradients: nothing moves
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        self.sched.step()
        correct = (out.detach().argmax(1) == y).sum()
        return torch.stack([loss_sum.detach().double(), correct.double()])

    def save(self, directory: Path, epoch: int, result: TrainResult, rewind: bool) -> None:
        if not self.world.main:
            return
        ckpt = {
            "epoch": epoch,
            "meta": self.meta,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "rng": _get_rng(),
            "history": result.history,
        }
        if self.scaler is not None:
            ckpt["scaler"] = self.scaler.state_dict()
        if rewind:
            atomic_save(ckpt, checkpoint_path(directory, epoch))
        atomic_save(ckpt, checkpoint_path(directory))

    def resume(self, path: Path, result: TrainResult) -> int:
        """Load ``path`` (every rank reads it); return its completed epochs."""
        ckpt = load_checkpoint(path, map_location=self.device)
        _check_meta(ckpt["meta"], self.meta, path)
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        _set_rng(ckpt["rng"])
        result.history = list(ckpt["history"])
        return ckpt["epoch"]


def _check_meta(found: dict, expected: dict, path: Path) -> None:
    if found != expected:
        raise ValueError(
            f"{path} was written by a different run ({found}, now {expected}); "
            "use a fresh checkpoint_dir or the original settings"
        )


def _get_rng() -> dict[str, Any]:
    rng: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _set_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"].cpu())
    if "cuda" in rng and torch.cuda.is_available():  # as many GPUs as are visible now
        states = rng["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all([s.cpu() for s in states])
