"""The stages of a run, declared once: :func:`stages`.

Contract: ``stages(cfg)`` lists every :class:`Stage` of ``cfg``'s run in the order
:func:`permask.experiment.pipeline.run` runs them, seed by seed. Each stage says what it is
(``kind`` and its settings), which stages it needs (``needs``, by :attr:`Stage.key`) and the
files it writes last (``outputs``: it is done when they all exist; all its paths come from
:mod:`permask.experiment.paths`). The pipeline runs these stages, ``--plan`` estimates them
(:mod:`permask.experiment.plan`) and the report reads what they wrote
(:mod:`permask.experiment.report`): none of them derives the list again. A scheduler may run
any stage whose needs are done. Nothing is read from disk here.

Example::

    from permask.experiment import RunConfig
    from permask.experiment.stages import stages

    for stage in stages(RunConfig(sparsity=[0.9], rewind=[2])):
        print(stage.key, "needs", stage.needs)
    # seed0/dense A needs ()
    # seed0/IMP needs ('seed0/dense A',)
    # seed0/dense B needs ()
    # seed0/align needs ('seed0/dense A', 'seed0/dense B')
    # seed0/lth s=0.9 k=2 needs ('seed0/dense A', 'seed0/IMP')
    # ...

Adding a stage: give it a kind here (its settings, needs and ``done`` path, in
:func:`_seed_stages`), a runner in :mod:`permask.experiment.runners` (``RUNNERS``) and a
cost in :mod:`permask.experiment.plan` (``COSTS``); docs/pipeline.md, "Adding a stage".
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from permask.experiment import paths
from permask.experiment.config import RunConfig
from permask.experiment.methods import METHODS

__all__ = ["Stage", "stages", "seeds_of"]

KINDS = ("dense", "imp", "align", "permuted masks", "sparse", "interpolation")


@dataclass(frozen=True)
class Stage:
    """One stage of one seed.

    ``seed`` is the repeat it belongs to (with ``shared_a``, A's stages belong to seed 0 only);
    ``name`` is what logs, ``--plan`` and ``results.json`` call it. Settings by kind:

    - ``dense``: ``role`` "A" or "B", trained for ``epochs`` from its init, keeping the
      checkpoints of ``keep`` epochs (the rewind points, and B's ``match_epoch``);
    - ``imp``: IMP on trained A to every requested sparsity;
    - ``align``: pi from A to B (at ``match_epoch`` if set);
    - ``permuted masks``: pi(m_A) at every sparsity (only when a method trains with it);
    - ``sparse``: ``method`` (:mod:`permask.experiment.methods`) from its rewind point
      ``rewind`` with the mask at ``sparsity``, from epoch ``start_epoch`` to ``epochs`` at peak
      ``lr`` (None: the run's), its steps preconditioned by ``precondition`` (None: plain);
    - ``interpolation``: the curves A -> B and pi(A) -> B.
    """

    seed: int
    kind: str
    name: str
    directory: Path  # where it writes (for trainings: its checkpoints)
    outputs: tuple[Path, ...]  # it is done when all of these exist
    needs: tuple[str, ...] = ()
    role: str | None = None
    method: str | None = None
    sparsity: float | None = None
    rewind: int | None = None
    epochs: int = 0
    start_epoch: int = 0
    lr: float | None = None
    keep: tuple[int, ...] = ()
    precondition: str | None = None

    @property
    def key(self) -> str:
        """Unique within a run: ``seed<s>/<name>``."""
        return f"seed{self.seed}/{self.name}"


def seeds_of(seed: int) -> dict[str, int]:
    """Init and data-order seeds of one repeat (distinct across roles and repeats)."""
    base = 1000 * seed
    return {"a": base + 1, "b": base + 2, "sparse": base + 3, "imp": base + 4}


def stages(cfg: RunConfig) -> list[Stage]:
    """Every stage of ``cfg``'s run, in the order the pipeline runs them (see the module)."""
    return [stage for seed in range(cfg.seeds) for stage in _seed_stages(cfg, seed)]


def _seed_stages(cfg: RunConfig, seed: int) -> Iterator[Stage]:
    run, a_of = cfg.run_dir, paths.a_seed(cfg, seed)
    own, a_dir = paths.seed_dir(run, seed), paths.seed_dir(run, a_of)
    dense_a, dense_b = f"seed{a_of}/dense A", f"seed{seed}/dense B"
    imp_key, align_key = f"seed{a_of}/IMP", f"seed{seed}/align"
    if a_of == seed:  # else seed 0's A and IMP serve this seed
        yield _dense(cfg, seed, "A", a_dir, keep=set(cfg.rewind))
        masks, evals = paths.imp_files(cfg, a_dir)
        outputs = (*masks.values(), *evals.values())
        yield Stage(seed, "imp", "IMP", paths.imp_dir(a_dir), outputs, (dense_a,))
    match = {cfg.match_epoch} if cfg.match_epoch is not None else set()
    yield _dense(cfg, seed, "B", own, keep=set(cfg.rewind) | match)
    pi = paths.align_path(own)
    yield Stage(seed, "align", "align", pi.parent, (pi,), (dense_a, dense_b))
    moved_key = f"seed{seed}/permuted masks"
    if any(METHODS[m].aligned for m in cfg.methods):
        moved = tuple(paths.permuted_mask_path(own, s) for s in cfg.sparsity)
        yield Stage(seed, "permuted masks", "permuted masks", moved[0].parent, moved,
                    (imp_key, align_key))  # fmt: skip
    restart = cfg.sparse_schedule == "restart"  # else the dense schedule resumed at k
    pre = None if cfg.sparse_precondition == "none" else cfg.sparse_precondition
    for s in cfg.sparsity:
        for k in cfg.rewind:
            for method in (METHODS[m] for m in cfg.methods):
                needs = [dense_a] if method.init == "A" or method.signs else []
                needs += [dense_b] if method.init == "B" else []
                needs += [imp_key] + ([align_key, moved_key] if method.aligned else [])
                directory = paths.sparse_dir(own, method.name, s, k, pre)
                name = f"{method.name} s={s:g} k={k}" + (f" {pre}" if pre else "")
                yield Stage(
                    seed, "sparse", name, directory, (paths.eval_path(directory),), tuple(needs),
                    method=method.name, sparsity=s, rewind=k,
                    epochs=cfg.epochs - k if restart else cfg.epochs,
                    start_epoch=0 if restart else k,
                    lr=(cfg.sparse_lr or cfg.lr) if restart else None, precondition=pre,
                )  # fmt: skip
    curves = paths.interpolation_path(own)
    yield Stage(
        seed, "interpolation", "interpolation", own, (curves,), (dense_a, dense_b, align_key)
    )


def _dense(cfg: RunConfig, seed: int, role: str, seed_dir: Path, keep: set[int]) -> Stage:
    directory = paths.dense_dir(seed_dir, role)
    return Stage(seed, "dense", f"dense {role}", directory, (paths.eval_path(directory),), (),
                 role=role, epochs=cfg.epochs, keep=tuple(sorted(keep)))  # fmt: skip
