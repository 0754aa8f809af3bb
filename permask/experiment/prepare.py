"""A run made ready: :func:`prepare` checks a config against this machine, loads its data and
traces its model, and returns the :class:`Experiment` every stage works with.

Nothing is trained or written here. Every check that needs no data runs before any data is read,
so a typo costs no download. Errors are :class:`ConfigError` with a one-line message.

Example::

    from permask.experiment import RunConfig
    from permask.experiment.prepare import prepare

    exp = prepare(RunConfig(model="mlp", dataset="mnist", epochs=2))
    model = exp.build(0)  # a fresh model from init seed 0, on the run's device
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from permask.data.datasets import DataNotFoundError
from permask.data.loader import get_loaders
from permask.data.protocol import Loader
from permask.experiment.config import ConfigError, RunConfig, read_run_config
from permask.experiment.distributed import World, init_world
from permask.experiment.train import TrainResult, train
from permask.graph import PermutationGraph, TraceError, trace
from permask.models import build_model, check_model_name, run_model_kwargs

__all__ = ["Experiment", "attach_log", "prepare"]


@dataclass
class Experiment:
    """A validated config with its data loaded and model traced: ready to run, nothing trained."""

    cfg: RunConfig
    train_loader: Loader
    test_loader: Loader
    num_classes: int
    in_channels: int
    image_size: int
    log: logging.Logger
    world: World = World()  # this process among torchrun's; rank 0 writes and logs
    graph: PermutationGraph | None = None  # set by prepare()
    timings: dict[tuple[int, str], float] = field(default_factory=dict)  # (seed, stage) -> s

    @contextlib.contextmanager
    def timed(self, seed: int, stage: str) -> Iterator[None]:
        """Record the wall time of ``stage`` (named as in :mod:`permask.experiment.stages`)."""
        t0 = time.perf_counter()
        yield
        self.timings[(seed, stage)] = time.perf_counter() - t0

    def build(self, init_seed: int) -> nn.Module:
        """A fresh model from ``init_seed`` (on the run's device and memory format)."""
        torch.manual_seed(init_seed)
        model = self._new_model().to(self.cfg.device)
        if self.cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def _new_model(self) -> nn.Module:
        cfg = self.cfg
        kw = run_model_kwargs(cfg.model, cfg.width, cfg.batch_norm)
        return build_model(cfg.model, self.num_classes, self.in_channels, self.image_size, **kw)

    def fit(
        self,
        model: nn.Module,
        loader: Loader,
        directory: Path | None,
        desc: str,
        **overrides: Any,
    ) -> TrainResult:
        """:func:`train` with the run's recipe (changed by ``overrides``), resuming in a dir."""
        cfg = self.cfg
        recipe = dict(
            epochs=cfg.epochs,
            lr=cfg.lr,
            schedule=cfg.schedule,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            optimizer=cfg.optimizer,
            device=cfg.device,
            progress=cfg.progress,
            distributed=self.world.active,
            amp=cfg.amp,
            sync_bn=cfg.sync_bn,
            compile=cfg.compile,
        )
        return train(model, loader, **{**recipe, **overrides}, checkpoint_dir=directory, desc=desc)

    def loader(self, seed: int) -> Loader:
        """The training loader with its own data-order seed (shares the image tensors)."""
        return self.train_loader.replace(seed=seed)

    def statistics_loader(self, shard: bool = False) -> Loader:
        """Training data for matching and BN statistics: shuffled, not augmented, big batches;
        this rank's share of each batch with ``shard`` (else all of it, as on one process)."""
        settings = dict(seed=0, augment=False, batch_size=self.test_loader.batch_size)
        if not shard:
            settings.update(rank=0, world_size=1)
        return self.train_loader.replace(**settings)


def prepare(cfg: RunConfig) -> Experiment:
    """Check everything that can fail before training: device, model name, run dir, data, tracing.

    Checks that need no data run before any data is read or downloaded.

    Raises :class:`ConfigError` with a one-line message.
    """
    if cfg.device == "auto":  # the Experiment holds the device actually used
        cfg = replace(cfg, device="cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(cfg.device)
    except RuntimeError:
        raise ConfigError(
            f"device must be auto or a torch device such as cpu or cuda:0, got {cfg.device!r}"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {cfg.device!r}: this torch build or machine has no CUDA")
    if device.type == "mps":
        raise ConfigError(
            "device 'mps' has no float64, which alignment and the metrics accumulate in; "
            "use --device cpu"
        )
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:  # under torchrun: join the process group; cuda becomes cuda:LOCAL_RANK
        world, device_name = init_world(cfg.device, cfg.dist_timeout)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    cfg = replace(cfg, device=device_name)
    if cfg.sync_bn and torch.device(cfg.device).type != "cuda":
        raise ConfigError(
            f"sync_bn needs GPUs (torch's SyncBatchNorm has no CPU kernel), device is {cfg.device}"
        )
    if world.active and cfg.batch_size < world.size:
        raise ConfigError(
            f"batch_size {cfg.batch_size} is the global batch and must be >= the {world.size} "
            "processes; raise --batch-size"
        )
    try:  # every check that needs no data comes first: a typo costs no download
        check_model_name(cfg.model)
        run_model_kwargs(cfg.model, cfg.width, cfg.batch_norm)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    _check_run_dir(cfg)
    try:
        train_loader, test_loader, info = get_loaders(
            cfg.dataset,
            cfg.data_dir,
            batch_size=cfg.batch_size,
            device=cfg.device,
            train_subset=cfg.train_subset,
            test_subset=cfg.test_subset,
            channels_last=cfg.channels_last,
            crop=cfg.crop,
            workers=cfg.workers,
        )
    except (DataNotFoundError, ValueError) as err:
        raise ConfigError(" ".join(str(err).split())) from None
    train_loader = train_loader.replace(rank=world.rank, world_size=world.size)
    x = test_loader.example(2)
    log = logging.getLogger(f"permask.run.{cfg.run_dir.resolve()}")
    exp = Experiment(
        cfg, train_loader, test_loader, info.num_classes, x.shape[1], x.shape[-1], log, world
    )
    try:
        model = exp.build(0)
    except Exception as err:  # unknown names surface from timm/torchvision in many types
        raise ConfigError(f"cannot build model {cfg.model!r}: {err}") from None
    try:
        exp.graph = trace(model, (x,))
    except TraceError as err:
        raise ConfigError(f"cannot trace {cfg.model!r}: {' '.join(str(err).split())}") from None
    return exp


def _check_run_dir(cfg: RunConfig) -> None:
    """The run directory is new, or holds a run with the same result-determining settings."""
    saved = read_run_config(cfg.run_dir)
    if saved is None:
        return
    old, new = saved.results_key(), cfg.results_key()
    diff = [k for k in new if old[k] != new[k]]
    if diff:
        k = diff[0]
        raise ConfigError(
            f"{cfg.run_dir} holds a run with other settings ({k}: {old[k]!r} there, "
            f"{new[k]!r} now); use another --out"
        )


def attach_log(log: logging.Logger, path: Path | None) -> logging.Handler:
    """Console and ``path``; without a path (ranks other than 0) errors only, on the console."""
    log.propagate = False
    if path is None:
        log.setLevel(logging.ERROR)
        return logging.NullHandler()
    log.setLevel(logging.INFO)
    if not any(isinstance(h, logging.StreamHandler) and h.stream is not None for h in log.handlers):
        console = logging.StreamHandler()
        console.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(console)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    return handler
