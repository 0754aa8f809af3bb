"""Where a run keeps what: the one place that spells a run directory's paths.

The pipeline writes these files, ``--plan`` checks which exist, and the report reads them::

    RUN_DIR/seed{s}/dense_a, dense_b/       eval.pt (a stage is done when it exists), last.pt
    RUN_DIR/seed{s}/imp/round{r:02d}/       one IMP round's training
    RUN_DIR/seed{s}/imp/s{sparsity}/        eval.pt of m_A's model at that sparsity
    RUN_DIR/seed{s}/masks/imp_s{sparsity}.safetensors
    RUN_DIR/seed{s}/align/pi.safetensors    the permutation
    RUN_DIR/seed{s}/sparse/{method}_s{sparsity}_k{rewind}/
    RUN_DIR/seed{s}/interpolation.json

With ``shared_a`` every seed's A (dense A, IMP, masks) is seed 0's (:func:`a_seed`).
"""

from __future__ import annotations

from pathlib import Path

from permask.experiment.config import RunConfig

__all__ = [
    "a_seed",
    "align_path",
    "eval_path",
    "imp_files",
    "imp_round_dir",
    "interpolation_path",
    "seed_dir",
    "sparse_dir",
]


def seed_dir(run_dir: Path, seed: int) -> Path:
    """One repeat's directory."""
    return run_dir / f"seed{seed}"


def a_seed(cfg: RunConfig, seed: int) -> int:
    """The seed whose A (dense A, IMP, m_A) serves ``seed``: itself, or 0 with ``shared_a``."""
    return 0 if cfg.shared_a else seed


def imp_files(cfg: RunConfig, a_dir: Path) -> tuple[dict[float, Path], dict[float, Path]]:
    """IMP's mask and evaluation files, per sparsity: IMP is done when all exist."""
    masks = {s: a_dir / "masks" / f"imp_s{s:g}.safetensors" for s in cfg.sparsity}
    return masks, {s: eval_path(a_dir / "imp" / f"s{s:g}") for s in cfg.sparsity}


def imp_round_dir(a_dir: Path, r: int) -> Path:
    """The training directory of IMP round ``r`` (from 1)."""
    return a_dir / "imp" / f"round{r:02d}"


def eval_path(directory: Path) -> Path:
    """A trained model's evaluation: its stage is done when this exists."""
    return directory / "eval.pt"


def align_path(own_dir: Path) -> Path:
    """The permutation moving this seed's A into its B."""
    return own_dir / "align" / "pi.safetensors"


def interpolation_path(own_dir: Path) -> Path:
    """The naive and permuted interpolation curves and barriers."""
    return own_dir / "interpolation.json"


def sparse_dir(own_dir: Path, method: str, sparsity: float, rewind: int) -> Path:
    """The directory of one sparse training (``method`` from w^k with the mask at sparsity)."""
    return own_dir / "sparse" / f"{method}_s{sparsity:g}_k{rewind}"
