"""The paper's published numbers, as data: what ``permask report RUN_DIR --paper`` compares with.

Transcribed from the "Headline numbers" of ``shared/reference/paper.md`` (this project's working
notes on Adnan et al., *Sparse Training from Random Initialization: Aligning Lottery Ticket Masks
using Weight Symmetry*, ICML 2025); nothing here is derived or estimated. Test accuracies in %.

A row is keyed by model, width, dataset, method (``dense``, ``imp``, ``lth``, ``permuted``,
``naive``), sparsity (a fraction; ``None`` for dense), rewind point ``k`` and ``match_epoch``
(``None``: pi from the final B; 5: from B after 5 epochs, the paper's early matching).
``rewind=None`` matches any k: dense and IMP have none, and Table 1 does not state its k (our
notes lack it), so its rows answer every k at 90%, after a rewinding table's row of that exact k.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from .config import RunConfig

__all__ = ["PublishedRow", "PUBLISHED", "match_epoch", "published", "reported", "reported_settings"]

PAPER = "Adnan et al., ICML 2025"


class PublishedRow(NamedTuple):
    model: str
    width: int
    dataset: str
    method: str
    sparsity: float | None
    rewind: int | None  # None: any k (dense, IMP, Table 1)
    match_epoch: int | None  # None: pi from the final B
    acc: float
    source: str
    acc_std: float | None = None  # the "+/-" where the paper prints one
    ensemble_acc: float | None = None
    disagreement: float | None = None
    kl: float | None = None
    js: float | None = None


# Table 1, 90% sparsity: method -> (acc, +/-, ensemble acc, disagreement, KL, JS)
_TABLE1 = {
    (1, "cifar10"): {
        "dense": (92.76, 0.11, None, None, None, None),
        "imp": (91.09, 0.04, 93.25, 0.093, 0.352, 0.130),
        "lth": (91.15, 0.16, 91.43, 0.035, 0.038, 0.011),
        "permuted": (89.38, 0.17, 91.75, 0.107, 0.273, 0.091),
        "naive": (88.68, 0.21, 91.07, 0.113, 0.271, 0.089),
    },
    (4, "cifar100"): {
        "dense": (78.37, None, None, None, None, None),
        "imp": (74.46, None, 79.27, 0.259, 1.005, 0.372),
        "lth": (75.35, None, 75.99, 0.117, 0.134, 0.038),
        "permuted": (72.48, None, 77.85, 0.278, 0.918, 0.327),
        "naive": (71.05, None, 76.15, 0.290, 0.970, 0.348),
    },
}

# ResNet20x4 CIFAR-10 (dense 95.95), mean of 3 seeds: sparsity -> k -> (LTH, naive, permuted)
_X4_CIFAR10 = {
    0.80: {0: (94.67, 94.36, 94.39), 20: (95.88, 94.69, 95.17),
           50: (95.81, 95.07, 95.43), 75: (95.83, 95.02, 95.40)},
    0.90: {0: (94.43, 93.79, 93.97), 20: (95.66, 94.35, 94.92),
           50: (95.56, 94.27, 95.04), 75: (95.62, 94.23, 95.07)},
    0.95: {0: (93.65, 93.27, 93.54), 20: (95.26, 93.66, 94.61),
           50: (95.40, 93.43, 94.75), 75: (95.19, 93.51, 94.75)},
    0.97: {0: (93.00, 92.63, 92.81), 20: (94.96, 92.74, 94.00),
           50: (95.00, 92.28, 94.07), 75: (94.94, 92.02, 94.32)},
}  # fmt: skip

# ResNet20x1 CIFAR-10, k=20: sparsity -> (LTH, naive, permuted)
_X1_CIFAR10_K20 = {
    0.80: (92.25, 90.13, 90.68),
    0.90: (91.18, 88.83, 89.50),
    0.95: (90.58, 87.31, 88.29),
    0.97: (89.21, 85.36, 86.12),
}


def _rows() -> tuple[PublishedRow, ...]:
    rows = []
    for (width, dataset), table in _TABLE1.items():
        src = f"{PAPER}, Table 1, ResNet20x{width} {dataset.upper().replace('CIFAR', 'CIFAR-')}"
        for method, (acc, std, ens, dis, kl, js) in table.items():
            sp = None if method == "dense" else 0.9
            rows.append(PublishedRow("resnet20", width, dataset, method, sp, None, None, acc,
                                     src, std, ens, dis, kl, js))  # fmt: skip
    src = f"{PAPER}, rewinding table, ResNet20x4 CIFAR-10"
    rows.append(PublishedRow("resnet20", 4, "cifar10", "dense", None, None, None, 95.95, src))
    for sp, by_k in _X4_CIFAR10.items():
        for k, accs in by_k.items():
            rows += _three(4, sp, k, accs, src)
    src = f"{PAPER}, k=20 table, ResNet20x1 CIFAR-10"
    for sp, accs in _X1_CIFAR10_K20.items():
        rows += _three(1, sp, 20, accs, src)
    src = f"{PAPER}, early matching, ResNet20x1 CIFAR-10 (pi from B at epoch 5)"
    rows.append(PublishedRow("resnet20", 1, "cifar10", "permuted", 0.97, 20, 5, 85.77, src))
    return tuple(rows)


def _three(width: int, sp: float, k: int, accs: tuple, src: str) -> list[PublishedRow]:
    """The LTH, naive and permuted rows of one (sparsity, k) cell of a CIFAR-10 table."""
    return [PublishedRow("resnet20", width, "cifar10", m, sp, k, None, acc, src)
            for m, acc in zip(("lth", "naive", "permuted"), accs)]  # fmt: skip


PUBLISHED: tuple[PublishedRow, ...] = _rows()


def published(
    cfg: RunConfig, method: str, sparsity: float | None, rewind: int | None
) -> PublishedRow | None:
    """The paper's row for ``method`` at ``sparsity`` and ``rewind`` in ``cfg``'s setting
    (model, width, dataset, match epoch), or None. A row of the exact k wins over one of any k."""
    epoch = match_epoch(cfg) if method == "permuted" else None  # pi: only the permuted mask
    found = [
        r
        for r in reported(cfg)
        if r.method == method
        and _same(r.sparsity, sparsity)
        and r.rewind in (None, rewind)
        and r.match_epoch == epoch
    ]
    return min(found, key=lambda r: r.rewind is None, default=None)


def match_epoch(cfg: RunConfig) -> int | None:
    """The epoch of B that ``cfg`` aligns to; None for the final B (unset, or ``epochs``)."""
    return None if cfg.match_epoch in (None, cfg.epochs) else cfg.match_epoch


def reported(cfg: RunConfig) -> list[PublishedRow]:
    """Every published row of ``cfg``'s model, width and dataset (empty: not in the paper)."""
    return [r for r in PUBLISHED if (r.model, r.width, r.dataset) == _setting(cfg)]


def reported_settings() -> str:
    """The settings the paper reports, e.g. ``resnet20 x1 on cifar10, ...``."""
    settings = sorted({(r.model, r.width, r.dataset) for r in PUBLISHED})
    return ", ".join(f"{m} x{w} on {d}" for m, w, d in settings)


def _setting(cfg: RunConfig) -> tuple[str, int, str]:
    return cfg.model, cfg.width, cfg.dataset


def _same(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, abs_tol=1e-9)
