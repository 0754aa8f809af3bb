"""The experiment's configuration: one dataclass, read from YAML and/or command-line flags.

Every field is both a YAML key and a flag (``hidden_size`` -> ``--hidden-size``); flags override
YAML, which overrides the defaults. The defaults are ``permask demo``: an MLP 784-512-512-512-10
on Fashion-MNIST, 10 epochs of SGD, IMP with fine-tuning to 98%, rewind k=2, activation matching.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from permask.experiment.compiled import COMPILE
from permask.experiment.errors import ConfigError
from permask.experiment.methods import METHODS, PAPER_METHODS
from permask.experiment.recipes import check_needs, find_config, recipe_values
from permask.match.matchers import matcher_names
from permask.sparse.precondition import PRECONDITIONERS

__all__ = [
    "ConfigError",
    "RunConfig",
    "add_config_flags",
    "config_from_flags",
    "load_config",
    "read_run_config",
]

# Fields that may change between invocations of one run directory without changing its results.
RUNTIME_FIELDS = (
    "device",
    "threads",
    "jobs",
    "progress",
    "out",
    "data_dir",
    "dist_timeout",
    "workers",
    "channels_last",
)


# Fields choosing which sparse trainings run: each writes its own directory, so they may change
# between invocations of one run directory (the report shows every one that has finished).
SELECTION_FIELDS = ("methods", "sparse_precondition")


def _setting(default: Any, help: str) -> Any:
    """A config field: its default (a list is copied per config) and its ``--help`` text."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class RunConfig:
    """Settings of one run of the paper's pipeline (see ``docs/pipeline.md``)."""

    model: str = _setting(
        "mlp", "resnet20, vgg11, mlp, timm:NAME, tv:NAME or module.path:factory (your own)"
    )
    width: int = _setting(1, "width multiplier of resnet20 / vgg11")
    batch_norm: bool = _setting(False, "vgg11 with BatchNorm (the paper's VGG11 has none)")
    dataset: str = _setting(
        "fashion_mnist", "mnist, fashion_mnist, cifar10, cifar100, imagefolder:PATH"
    )
    data_dir: str | None = _setting(
        None, "data root (default: $PERMASK_DATA, then standard places)"
    )
    train_subset: int | None = _setting(
        None, "train on a fixed random subset of this many examples (default: all)"
    )
    test_subset: int | None = _setting(
        None, "evaluate on a fixed random subset of this many examples (default: all)"
    )
    seeds: int = _setting(1, "number of seeds (independent repeats of the whole pipeline)")
    shared_a: bool = _setting(
        False, "train A, IMP and m_A once (seed 0) and reuse them for every seed"
    )
    epochs: int = _setting(10, "epochs of dense training (and of sparse training, counted from 0)")
    batch_size: int = _setting(128, "training batch size")
    optimizer: str = _setting("sgd", "sgd, adam or adamw")
    lr: float = _setting(0.05, "peak learning rate of dense and sparse training")
    schedule: str = _setting(
        "cosine",
        "learning-rate schedule of dense and sparse training: cosine (to 0) or step (x0.1 at "
        "1/3, 2/3 and 8/9 of the epochs: 30, 60, 80 of 90, the paper's ImageNet recipe); IMP "
        "fine-tuning is always cosine",
    )
    momentum: float = _setting(0.9, "SGD momentum")
    weight_decay: float = _setting(5e-4, "weight decay (all parameters, as in the paper)")
    warmup_epochs: int = _setting(0, "linear warm-up epochs of dense training")
    sparsity: list[float] = _setting([0.98], "target sparsities in (0, 1), e.g. 0.9 0.97")
    rewind: list[int] = _setting([2], "rewind points k (completed epochs) for sparse training")
    sparse_schedule: str = _setting(
        "continue",
        "sparse training from k: continue (the dense cosine resumed at k, learning-rate "
        "rewinding) or restart (a fresh cosine over epochs - k at sparse_lr, as in the paper)",
    )
    sparse_lr: float | None = _setting(None, "peak lr of a restarted sparse schedule (default: lr)")
    methods: list[str] = _setting(
        list(PAPER_METHODS),
        f"sparse trainings to compare: any of {', '.join(METHODS)} (docs/pipeline.md, Methods)",
    )
    sparse_precondition: str = _setting(
        "none",
        "preconditioner of the sparse trainings' steps: none or sparseopt (per-neuron "
        "sqrt(1 - s_i) / sqrt(1 - s_avg), Adnan et al. 2026)",
    )
    imp: str = _setting("finetune", "IMP variant: finetune (the paper) or rewind (Frankle et al.)")
    imp_rate: float = _setting(0.2, "fraction of the remaining weights pruned per IMP round")
    finetune_epochs: int = _setting(1, "epochs of fine-tuning per IMP round (finetune variant)")
    finetune_lr: float = _setting(0.01, "peak learning rate of IMP fine-tuning (cosine per round)")
    dense_shortcuts: bool = _setting(True, "never prune residual shortcut/downsample convs")
    match: str = _setting("activation", "alignment method: activation, weight or ste (a matcher)")
    match_epoch: int | None = _setting(
        None, "align A to B's checkpoint after this many epochs (default: final B)"
    )
    match_batches: int | None = _setting(
        None, "batches of training data for activation matching (default: all)"
    )
    interp_points: int = _setting(11, "points on the interpolation curve between pi(A) and B")
    interp_batches: int | None = _setting(
        None, "test batches per interpolation point (default: all)"
    )
    interp_bn_samples: int = _setting(
        2048, "training images per BatchNorm re-estimation along the interpolation (0: all)"
    )
    crop: int | None = _setting(
        None,
        "imagefolder: stream from disk with ImageNet transforms at this crop size "
        "(default: 224 when the images are >= 128 px, else decode the set into memory)",
    )
    workers: int = _setting(4, "DataLoader processes decoding a streamed image folder")
    channels_last: bool = _setting(
        True, "channels_last memory format for conv weights and images (faster convs)"
    )
    amp: str = _setting(
        "off", "mixed precision of training: off, bf16 or fp16 (autocast; fp16 with GradScaler)"
    )
    compile: str = _setting(
        "off",
        "torch.compile the training forward and backward: off, inductor, inductor-cudagraphs "
        "(CUDA graphs) or aot_eager; eager again after a compile failure (one warning)",
    )
    sync_bn: bool = _setting(
        False, "under torchrun on GPUs: BatchNorm over the global batch (SyncBatchNorm) in training"
    )
    device: str = _setting(
        "auto", "torch device: auto (cuda if available, else cpu), cpu, cuda:1, ..."
    )
    threads: int | None = _setting(
        None, "torch CPU threads of each job (default: torch's choice, split between the jobs)"
    )
    jobs: int = _setting(
        1,
        "stages run at once, each in a worker process as soon as the stages it needs are done "
        "(the same results as 1; under torchrun always 1)",
    )
    dist_timeout: float = _setting(
        600.0,
        "under torchrun: seconds a process waits in a collective for the others before it fails "
        "(a dead rank ends the run with an error, not a hang)",
    )
    progress: bool = _setting(
        True, "show progress bars (on a terminal only; a log file gets plain lines)"
    )
    out: str | None = _setting(None, "run directory (default: runs/<model>-<dataset>)")

    def __post_init__(self) -> None:
        self.sparsity = sorted({float(s) for s in self.sparsity})
        self.rewind = sorted({int(k) for k in self.rewind})
        unknown = [m for m in self.methods if m not in METHODS]  # validate() names them
        self.methods = [m for m in METHODS if m in self.methods] + unknown  # the order they run
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` for settings that cannot run (no data or models touched)."""
        if not self.sparsity or not all(0.0 < s < 1.0 for s in self.sparsity):
            raise ConfigError(f"sparsity must be in (0, 1), got {self.sparsity}")
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            got = f"unknown method {unknown[0]!r}" if unknown else "methods is empty"
            raise ConfigError(f"{got}; methods must be one or more of {', '.join(METHODS)}")
        if not self.rewind or not all(0 <= k < self.epochs for k in self.rewind):
            raise ConfigError(
                f"rewind points must be in [0, epochs) = [0, {self.epochs}), got {self.rewind}"
            )
        if self.match_epoch is not None and not 0 <= self.match_epoch <= self.epochs:
            raise ConfigError(f"match_epoch must be in [0, {self.epochs}], got {self.match_epoch}")
        choices = {"imp": ("finetune", "rewind"), "match": matcher_names()}
        choices["optimizer"] = ("sgd", "adam", "adamw")
        choices["sparse_schedule"] = ("continue", "restart")
        choices["amp"] = ("off", "bf16", "fp16")
        choices["compile"] = tuple(COMPILE)
        choices["sparse_precondition"] = ("none", *PRECONDITIONERS)
        choices["schedule"] = ("cosine", "step")
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                got = getattr(self, key)
                raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {got!r}")
        for key in ("seeds", "width", "batch_size", "finetune_epochs", "jobs"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.interp_points < 2:
            raise ConfigError(f"interp_points must be >= 2 (A and B), got {self.interp_points}")
        if self.interp_bn_samples < 0:
            raise ConfigError(
                f"interp_bn_samples must be >= 0 (0: all), got {self.interp_bn_samples}"
            )
        if self.sparse_lr is not None and not self.sparse_lr > 0:
            raise ConfigError(f"sparse_lr must be > 0, got {self.sparse_lr}")
        if self.sparse_lr is not None and self.sparse_schedule != "restart":
            raise ConfigError("sparse_lr applies only with sparse_schedule restart")
        if not 0.0 < self.imp_rate < 1.0:
            raise ConfigError(f"imp_rate must be in (0, 1), got {self.imp_rate}")
        for key in ("lr", "finetune_lr"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key} must be > 0, got {getattr(self, key)}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.crop is not None and self.crop < 8:
            raise ConfigError(f"crop must be >= 8 pixels, got {self.crop}")
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")
        if not self.dist_timeout > 0:
            raise ConfigError(f"dist_timeout must be > 0 seconds, got {self.dist_timeout}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        if self.out is not None and not str(self.out).strip():
            raise ConfigError("out is empty; give a run directory or leave it out for the default")

    @property
    def run_dir(self) -> Path:
        name = f"{self.model.replace(':', '-')}-{self.dataset.replace(':', '-')}"
        return Path(self.out if self.out is not None else Path("runs") / name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def results_key(self) -> dict[str, Any]:
        """The settings that determine the results of every stage (runtime-only fields and the
        choice of sparse trainings removed): a run directory holds one of these."""
        leave_out = RUNTIME_FIELDS + SELECTION_FIELDS
        return {k: v for k, v in self.to_dict().items() if k not in leave_out}


def _fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(RunConfig))


def _base_type(tp: Any) -> tuple[type, bool]:
    """``(element type, is_list)`` of a field annotation, optional ``| None`` removed."""
    if isinstance(tp, str):
        tp = eval(tp, vars(typing), {"list": list})  # postponed annotations of this module
    if isinstance(tp, types.UnionType):
        tp = next(a for a in tp.__args__ if a is not type(None))
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0], True
    return tp, False


def _coerce(name: str, value: Any) -> Any:
    tp, is_list = _base_type(next(f.type for f in _fields() if f.name == name))
    if value is None:
        return None
    try:
        if is_list:
            items = value if isinstance(value, (list, tuple)) else [value]
            return [tp(v) for v in items]
        if tp is bool and not isinstance(value, bool):
            raise ValueError(value)
        return tp(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: cannot read {value!r} as {tp.__name__}") from None


def config_from_dict(values: dict[str, Any]) -> RunConfig:
    """A validated config from ``{field: value}``; unknown keys are an error."""
    known = {f.name for f in _fields()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return RunConfig(**{k: _coerce(k, v) for k, v in values.items()})


def load_config(path: str | os.PathLike, **overrides: Any) -> RunConfig:
    """Read a YAML mapping of config keys (dashes or underscores; ``recipe: NAME`` starts from a
    recipe, :mod:`permask.experiment.recipes`), then apply ``overrides``."""
    recipe, values = _read_yaml(path)
    return _compose({}, [recipe], values, overrides)


def _read_yaml(path: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """A YAML config's recipe name (or None) and its other keys; ``path`` may also name a
    shipped config (``paper/resnet20x4_cifar10``)."""
    path = find_config(path)
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys")
    values = {str(k).replace("-", "_"): v for k, v in data.items()}
    return values.pop("recipe", None), values


def _compose(
    defaults: dict[str, Any], recipes: list[Any], values: dict[str, Any], given: dict[str, Any]
) -> RunConfig:
    """``defaults``, then each recipe named (None: none; :mod:`permask.experiment.recipes`),
    then a YAML's ``values``, then ``given``, each overriding the ones before. A recipe's key
    that neither ``values`` nor ``given`` supplies (ImageNet's folder) is a ``ConfigError``."""
    merged = dict(defaults)
    for name in (str(n) for n in recipes if n is not None):
        check_needs(name, {**values, **given})
        merged.update(recipe_values(name))
    return config_from_dict({**merged, **values, **given})


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field; flags not given stay absent (so YAML values survive)."""
    for f in _fields():
        tp, is_list = _base_type(f.type)
        flag = "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        default = _default(f)  # a None default is explained by the help text itself
        kw["help"] = f.metadata["help"] + ("" if default is None else f" (default: {default})")
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            parser.add_argument(flag, type=tp, nargs="+" if is_list else None, **kw)


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return " ".join(map(str, f.default_factory()))
    return f.default


def config_from_flags(args: argparse.Namespace, **defaults: Any) -> RunConfig:
    """The config from parsed flags, each source overriding the ones before: ``defaults``, the
    YAML's ``recipe``, ``--recipe``, the ``--config`` YAML's keys, the flags given."""
    names = {f.name for f in _fields()}
    given = {k: v for k, v in vars(args).items() if k in names}
    yaml_recipe, yaml_values = None, {}
    path = getattr(args, "config", None)
    if path is not None:
        yaml_recipe, yaml_values = _read_yaml(path)
    return _compose(defaults, [yaml_recipe, getattr(args, "recipe", None)], yaml_values, given)


def read_run_config(run_dir: str | os.PathLike, **overrides: Any) -> RunConfig | None:
    """The config a run directory's ``config.yaml`` records (``None``: there is none), with
    ``overrides``; the one reader of a run's config. Keys this version does not know (written
    by a newer permask) are ignored; settings added since that run take their defaults, which
    is what that run used. ``ConfigError`` when the file is not a YAML mapping."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    try:
        saved = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        saved = None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} is not a config of permask run (a YAML mapping)")
    known = {f.name for f in _fields()}
    return config_from_dict({**{k: v for k, v in saved.items() if k in known}, **overrides})
