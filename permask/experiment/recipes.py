"""Recipes: the paper's hyperparameters as presets of :class:`RunConfig` values.

``permask run --recipe paper-cifar`` (or ``recipe: paper-cifar`` in a YAML config) starts from a
recipe's values; a YAML config's keys override them, and flags override both. ``config.yaml`` in
the run directory records the resolved values. The values come from the paper and its code
(``shared/reference/paper.md`` in this project's working notes; Adnan et al., ICML 2025, and
github.com/calgaryml/sparse-rebasin)::

    permask run --recipe paper-cifar --width 4 --sparsity 0.97 --rewind 20 --out runs/r20x4

- ``paper-cifar``: ResNet20 on CIFAR-10; dense SGD lr 0.08, momentum 0.9, wd 5e-4 on all
  parameters, cosine over 200 epochs, batch 128, flip + crop; IMP with fine-tuning, 20% of the
  remaining weights per round, 50 epochs at lr 0.01 per round, shortcuts dense; sparse training
  from k for 200 - k epochs on a fresh cosine at lr 0.02. 90% sparsity, k = 20, 3 seeds (the
  settings of the paper's ResNet20x1 tables).
- ``paper-imagenet``: torchvision ResNet50, 90 epochs, global batch 256, SGD lr 0.1 (x batch /
  256 if you change the batch), momentum 0.9, wd 1e-4, 5 warm-up epochs, step decay (30/60/80),
  IMP 20 epochs per level at lr 0.01, bf16 autocast, channels_last, crop 224; 90% sparsity,
  k = 5. Needs ``--dataset imagefolder:PATH``.
- ``demo``: the built-in defaults (MLP on Fashion-MNIST, 98%), as ``permask demo`` runs them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from permask.experiment.errors import ConfigError

__all__ = ["RECIPES", "NEEDS", "recipe_values", "check_needs", "shipped_configs", "find_config"]

_PAPER_IMP = dict(imp="finetune", imp_rate=0.2, dense_shortcuts=True, momentum=0.9,
                  optimizer="sgd")  # fmt: skip

RECIPES: dict[str, dict[str, Any]] = {
    "demo": {},
    "paper-cifar": dict(
        _PAPER_IMP, model="resnet20", dataset="cifar10", epochs=200, batch_size=128, lr=0.08,
        weight_decay=5e-4, schedule="cosine", warmup_epochs=0, finetune_epochs=50,
        finetune_lr=0.01, sparse_schedule="restart", sparse_lr=0.02, sparsity=[0.9],
        rewind=[20], seeds=3,
    ),
    "paper-imagenet": dict(
        _PAPER_IMP, model="tv:resnet50", epochs=90, batch_size=256, lr=0.1, weight_decay=1e-4,
        schedule="step", warmup_epochs=5, finetune_epochs=20, finetune_lr=0.01,
        sparsity=[0.9], rewind=[5], match_batches=100, interp_batches=50, crop=224, workers=8,
        amp="bf16", channels_last=True,
    ),
}  # fmt: skip


# what a recipe cannot choose for the user: config key -> the flag that gives it
NEEDS: dict[str, dict[str, str]] = {
    "paper-imagenet": {"dataset": "--dataset imagefolder:PATH (with train/ and val/)"},
}


def check_needs(name: str | None, given: dict[str, Any]) -> None:
    """A :class:`ConfigError` if recipe ``name`` needs a key that ``given`` lacks."""
    for key, flag in NEEDS.get(name or "", {}).items():
        if key not in given:
            raise ConfigError(f"the {name} recipe needs {flag}")


def recipe_values(name: str) -> dict[str, Any]:
    """A copy of recipe ``name``'s values; a :class:`ConfigError` names the known ones."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return {k: list(v) if isinstance(v, list) else v for k, v in RECIPES[name].items()}


def shipped_configs() -> dict[str, tuple[Path, str]]:
    """The configs installed with permask (``permask/configs/``): name (``paper/vgg11_cifar10``)
    -> (file, its first comment line). ``permask run --config NAME`` runs one; ``permask run
    --list-configs`` lists them."""
    root = Path(__file__).resolve().parents[1] / "configs"
    out = {}
    for path in sorted(root.rglob("*.yaml")):
        first = path.read_text().splitlines()[0] if path.stat().st_size else ""
        out[path.relative_to(root).with_suffix("").as_posix()] = (path, first.lstrip("# "))
    return out


def find_config(name: str | os.PathLike) -> Path:
    """``name`` itself if it is a file, else the shipped config of that name."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = shipped_configs()
    key = str(name).removesuffix(".yaml")
    if key in shipped:
        return shipped[key][0]
    raise ConfigError(
        f"no config file {str(name)!r} and no shipped config of that name; "
        "permask run --list-configs lists the shipped ones"
    )
