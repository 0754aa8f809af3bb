"""Where a run keeps what: the one place that spells a run directory's paths.

The stages (:mod:`permask.experiment.stages`) write these files, ``--plan`` checks which exist,
and the report reads them::

    RUN_DIR/seed{s}/dense_a, dense_b/       eval.pt (a stage is done when it exists), checkpoints
    RUN_DIR/seed{s}/imp/round{r:02d}/       one IMP round's training
    RUN_DIR/seed{s}/imp/s{sparsity}/        eval.pt of m_A's model at that sparsity
    RUN_DIR/seed{s}/masks/imp_s{sparsity}.safetensors       m_A
    RUN_DIR/seed{s}/masks/permuted_s{sparsity}.safetensors  pi(m_A) (the permuted masks stage)
    RUN_DIR/seed{s}/align/pi.safetensors    the permutation
    RUN_DIR/seed{s}/sparse/{method}_s{sparsity}_k{rewind}[_{precondition}]/
    RUN_DIR/seed{s}/interpolation.json

A training directory's checkpoints (``last.pt``, ``epoch_<k>.pt``) are the trainer's
(:func:`permask.experiment.train.checkpoint_path`). With ``shared_a`` every seed's A (dense A,
IMP, masks) is seed 0's (:func:`a_seed`).
"""

from __future__ import annotations

from pathlib import Path

from permask.experiment.config import RunConfig

__all__ = [
    "a_seed",
    "align_path",
    "dense_dir",
    "eval_path",
    "imp_dir",
    "imp_files",
    "imp_round_dir",
    "interpolation_path",
    "permuted_mask_path",
    "seed_dir",
    "sparse_dir",
]


def seed_dir(run_dir: Path, seed: int) -> Path:
    """One repeat's directory."""
    return run_dir / f"seed{seed}"


def a_seed(cfg: RunConfig, seed: int) -> int:
    """The seed whose A (dense A, IMP, m_A) serves ``seed``: itself, or 0 with ``shared_a``."""
    return 0 if cfg.shared_a else seed


def dense_dir(seed_dir: Path, role: str) -> Path:
    """The training directory of dense ``role`` ("A" or "B")."""
    return seed_dir / f"dense_{role.lower()}"


def imp_dir(a_dir: Path) -> Path:
    """IMP's rounds and evaluations."""
    return a_dir / "imp"


def imp_files(cfg: RunConfig, a_dir: Path) -> tuple[dict[float, Path], dict[float, Path]]:
    """IMP's mask and evaluation files, per sparsity: IMP is done when all exist."""
    masks = {s: _mask_path(a_dir, "imp", s) for s in cfg.sparsity}
    return masks, {s: eval_path(imp_dir(a_dir) / f"s{s:g}") for s in cfg.sparsity}


def permuted_mask_path(own_dir: Path, sparsity: float) -> Path:
    """pi(m_A) at ``sparsity``, for this seed's B."""
    return _mask_path(own_dir, "permuted", sparsity)


def _mask_path(directory: Path, which: str, sparsity: float) -> Path:
    return directory / "masks" / f"{which}_s{sparsity:g}.safetensors"


def imp_round_dir(a_dir: Path, r: int) -> Path:
    """The training directory of IMP round ``r`` (from 1)."""
    return imp_dir(a_dir) / f"round{r:02d}"


def eval_path(directory: Path) -> Path:
    """A trained model's evaluation: its stage is done when this exists."""
    return directory / "eval.pt"


def align_path(own_dir: Path) -> Path:
    """The permutation moving this seed's A into its B."""
    return own_dir / "align" / "pi.safetensors"


def interpolation_path(own_dir: Path) -> Path:
    """The naive and permuted interpolation curves and barriers."""
    return own_dir / "interpolation.json"


def sparse_dir(
    own_dir: Path, method: str, sparsity: float, rewind: int, precondition: str | None = None
) -> Path:
    """The directory of one sparse training (``method`` from w^k with the mask at sparsity,
    its steps preconditioned by ``precondition`` if given)."""
    suffix = f"_{precondition}" if precondition else ""
    return own_dir / "sparse" / f"{method}_s{sparsity:g}_k{rewind}{suffix}"
