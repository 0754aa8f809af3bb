"""One runner per kind of stage (``RUNNERS``), and :func:`run_stage`, which runs one stage of
:mod:`permask.experiment.stages` unless its outputs exist.

A runner reads what it needs from the files of the stages before it (trained models from their
checkpoints, masks and pi from safetensors) and writes its outputs atomically, so any stage can
run, in this process or another, once its needs are done (:mod:`permask.experiment.jobs`).
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from permask._atomic import atomic_path, atomic_save, atomic_write_bytes
from permask.data.protocol import Loader
from permask.experiment import paths
from permask.experiment.methods import METHODS
from permask.experiment.prepare import Experiment
from permask.experiment.stages import Stage, seeds_of
from permask.experiment.train import (
    bars_shown,
    checkpoint_path,
    evaluate,
    load_checkpoint,
    predict_proba,
)
from permask.graph import Permutation
from permask.match import align
from permask.metrics import barrier, interpolate
from permask.permute import permute_mask, permute_model, permute_tensors
from permask.sparse import ImpRound, Mask, imp, load_mask, save_mask, transfer_signs

__all__ = ["RUNNERS", "done_earlier", "run_stage", "sparse_start"]


def done_earlier(exp: Experiment, stage: Stage) -> bool:
    """Whether all of ``stage``'s outputs exist; if so, the log says it is skipped."""
    if not exp.world.exists(*stage.outputs):
        return False
    exp.log.info("[seed %d] %s: done earlier (skipped)", stage.seed, stage.name)
    return True


def run_stage(exp: Experiment, stage: Stage) -> float | None:
    """Run ``stage`` with its kind's runner, timed in ``exp.timings``; skip it (``None``) when
    it is :func:`done_earlier`. Returns its wall time in seconds."""
    if done_earlier(exp, stage):
        return None
    with exp.timed(stage.seed, stage.name):
        RUNNERS[stage.kind](exp, stage)
    return exp.timings[(stage.seed, stage.name)]


# --- what a stage reads: the files of the stages it needs ---


def _a_dir(exp: Experiment, seed: int) -> Path:
    """The seed directory holding the A (dense A, IMP, m_A) that serves ``seed``."""
    return paths.seed_dir(exp.cfg.run_dir, paths.a_seed(exp.cfg, seed))


def _own_dir(exp: Experiment, seed: int) -> Path:
    return paths.seed_dir(exp.cfg.run_dir, seed)


def _dense(exp: Experiment, seed: int, role: str, epoch: int | None = None) -> nn.Module:
    """Trained dense ``role`` of ``seed`` (its checkpoint after ``epoch`` epochs if given)."""
    seed_dir = _a_dir(exp, seed) if role == "A" else _own_dir(exp, seed)
    model = exp.build(0)
    load_checkpoint(checkpoint_path(paths.dense_dir(seed_dir, role), epoch), model)
    return model


def _imp_mask(exp: Experiment, seed: int, sparsity: float) -> Mask:
    masks, _ = paths.imp_files(exp.cfg, _a_dir(exp, seed))
    return load_mask(masks[sparsity], exp.cfg.device)


# --- the runners: one per kind of stage ---


def _run_dense(exp: Experiment, stage: Stage) -> None:
    """Dense ``stage.role`` from its init, keeping the checkpoints of ``stage.keep``."""
    init = seeds_of(stage.seed)[stage.role.lower()]
    model, loader = exp.build(init), exp.loader(init)
    name = f"[seed {stage.seed}] {stage.name}"
    _trained(exp, name, stage.directory, model, loader, keep=stage.keep)


def _run_sparse(exp: Experiment, stage: Stage) -> None:
    """``stage.method`` from its start (:func:`sparse_start`) for its epochs."""
    model, mask = sparse_start(exp, stage)
    recipe: dict[str, Any] = dict(epochs=stage.epochs, start_epoch=stage.start_epoch)
    if stage.lr is not None:
        recipe["lr"] = stage.lr
    loader = exp.loader(seeds_of(stage.seed)["sparse"])
    name = f"[seed {stage.seed}] {stage.name}"
    _trained(exp, name, stage.directory, model, loader, mask=mask,
             precondition=stage.precondition, **recipe)  # fmt: skip


def sparse_start(exp: Experiment, stage: Stage) -> tuple[nn.Module, Mask]:
    """The weights and mask a sparse ``stage`` trains from: its method's rewind point, mask and
    signs (:mod:`permask.experiment.methods`), read from the files of the stages it needs."""
    method, seed = METHODS[stage.method], stage.seed
    model = _dense(exp, seed, method.init, stage.rewind)
    if method.aligned:
        mask = _permuted_mask(exp, seed, stage.sparsity)
    else:
        mask = _imp_mask(exp, seed, stage.sparsity)
    if method.signs:
        signs = _dense(exp, seed, "A", stage.rewind).state_dict()
        if method.aligned:
            signs = permute_tensors(signs, _pi(exp, seed), exp.graph)
        model.load_state_dict(transfer_signs(signs, model.state_dict(), mask))
    return model, mask


def _pi(exp: Experiment, seed: int) -> Permutation:
    return Permutation.load(paths.align_path(_own_dir(exp, seed)))


def _permuted_mask(exp: Experiment, seed: int, sparsity: float) -> Mask:
    """pi(m_A), as the ``permuted masks`` stage wrote it."""
    return load_mask(paths.permuted_mask_path(_own_dir(exp, seed), sparsity), exp.cfg.device)


def _run_permuted_masks(exp: Experiment, stage: Stage) -> None:
    """pi(m_A) at every sparsity of the run, from m_A and pi."""
    pi = _pi(exp, stage.seed)
    for sparsity in exp.cfg.sparsity:
        mask = permute_mask(_imp_mask(exp, stage.seed, sparsity), pi, exp.graph)
        path = paths.permuted_mask_path(_own_dir(exp, stage.seed), sparsity)
        exp.world.written_by_main(_save_mask, mask, path)


def _trained(
    exp: Experiment,
    name: str,
    directory: Path,
    model: nn.Module,
    loader: Loader,
    *,
    start_epoch: int = 0,
    mask: Mask | None = None,
    keep: Iterable[int] = (),
    **recipe: Any,
) -> None:
    """Train ``model`` into ``directory`` (resuming from its checkpoint), then evaluate it once.
    ``recipe`` overrides the run's training settings (e.g. ``epochs``, ``lr``)."""
    cfg = exp.cfg
    t0 = time.perf_counter()
    warmup = cfg.warmup_epochs if mask is None and start_epoch == 0 else 0
    result = exp.fit(
        model,
        loader,
        directory,
        name,
        warmup_epochs=warmup,
        start_epoch=start_epoch,
        mask=mask,
        keep_epochs=keep,
        **recipe,
    )
    done = paths.eval_path(directory)
    acc = _evaluate_into(exp, model, done, time.perf_counter() - t0, result.resumed_from)
    resumed = f", resumed at epoch {result.resumed_from}" if result.resumed_from else ""
    exp.log.info(
        "%s: test acc %.2f%% (%.1f s%s)", name, 100 * acc, time.perf_counter() - t0, resumed
    )


def _evaluate_into(
    exp: Experiment, model: nn.Module, path: Path, seconds: float, resumed: int | None = None
) -> float:
    """Test loss, accuracy and softmax into ``path`` (written by rank 0); returns the accuracy.
    Every rank evaluates the whole test set (the same model: the same numbers)."""
    loss, acc = evaluate(model, exp.test_loader, exp.cfg.device)
    probs = predict_proba(model, exp.test_loader, exp.cfg.device)
    blob = {"probs": probs, "loss": loss, "acc": acc, "seconds": seconds}
    blob["resumed_from"] = -1 if resumed is None else resumed
    exp.world.written_by_main(atomic_save, blob, path)
    return acc


def _run_imp(exp: Experiment, stage: Stage) -> None:
    """IMP on (a copy of) trained A; masks and evaluations at every requested sparsity."""
    cfg, seed, a_dir = exp.cfg, stage.seed, _a_dir(exp, stage.seed)
    masks, evals = paths.imp_files(cfg, a_dir)
    seeds = seeds_of(seed)
    k = cfg.rewind[0]
    rewind = None
    if cfg.imp == "rewind":
        dense_a = paths.dense_dir(a_dir, "A")
        rewind = load_checkpoint(checkpoint_path(dense_a, k), map_location=cfg.device)["model"]

    def train_fn(model: nn.Module, mask: Mask, r: int) -> None:
        round_dir, desc = paths.imp_round_dir(a_dir, r), f"IMP round {r}"
        if cfg.imp == "rewind":
            exp.fit(model, exp.loader(seeds["a"]), round_dir, desc, start_epoch=k, mask=mask)
        else:
            loader = exp.loader(seeds["imp"] + r)
            recipe = dict(epochs=cfg.finetune_epochs, lr=cfg.finetune_lr, schedule="cosine")
            exp.fit(model, loader, round_dir, desc, mask=mask, **recipe)

    t0 = time.perf_counter()
    show = bars_shown(cfg.progress) and exp.world.main
    bar = tqdm(desc=f"[seed {seed}] IMP rounds", leave=False, disable=not show)

    def on_round(done: ImpRound) -> None:
        bar.total = done.rounds
        bar.update()
        for target in done.targets:
            exp.world.check_same(f"the {target:g} IMP mask", done.mask)  # identical weights
            exp.world.written_by_main(_save_mask, done.mask, masks[target])
            acc = _evaluate_into(exp, model, evals[target], time.perf_counter() - t0)
            msg = "[seed %d] IMP %.4g%% (round %d/%d): test acc %.2f%% (%.1f s)"
            dt = time.perf_counter() - t0
            exp.log.info(msg, seed, 100 * target, done.round, done.rounds, 100 * acc, dt)

    model = _dense(exp, seed, "A")
    with bar:
        imp(
            model, train_fn, cfg.sparsity, rate=cfg.imp_rate, rewind_state=rewind,
            dense_shortcuts=cfg.dense_shortcuts, on_round=on_round,
        )  # fmt: skip


def _run_align(exp: Experiment, stage: Stage) -> None:
    """pi moving A into B's basin (B at ``match_epoch`` if set), saved as safetensors."""
    cfg, seed = exp.cfg, stage.seed
    t0 = time.perf_counter()
    model_a, target = _dense(exp, seed, "A"), _dense(exp, seed, "B", cfg.match_epoch)
    loader = exp.statistics_loader(shard=True)  # each rank its share; statistics summed
    pi = align(
        model_a,
        target,
        loader,
        method=cfg.match,
        graph=exp.graph,
        max_batches=cfg.match_batches,
        device=cfg.device,
        distributed=exp.world.active,
    )
    exp.world.written_by_main(_save_atomically, pi.save, paths.align_path(_own_dir(exp, seed)))
    when = f" (B at epoch {cfg.match_epoch})" if cfg.match_epoch is not None else ""
    exp.log.info(
        "[seed %d] align (%s matching%s): %.1f s", seed, cfg.match, when, time.perf_counter() - t0
    )


def _save_mask(mask: Mask, path: Path) -> None:
    _save_atomically(functools.partial(save_mask, mask), path)


def _save_atomically(save: Callable[[Path], object], path: Path) -> None:
    """``save(tmp)`` into a temporary path that replaces ``path`` once complete."""
    with atomic_path(path) as tmp:
        save(tmp)


def _run_interpolation(exp: Experiment, stage: Stage) -> None:
    """Loss/accuracy along A -> B (naive) and pi(A) -> B (aligned), with barriers."""
    seed = stage.seed
    blob = _curves(exp, _dense(exp, seed, "A"), _dense(exp, seed, "B"), _pi(exp, seed))
    path = paths.interpolation_path(_own_dir(exp, seed))
    text = json.dumps(blob, indent=1).encode()
    exp.world.written_by_main(atomic_write_bytes, text, path)  # the same on every rank
    exp.log.info(
        "[seed %d] interpolation: loss barrier naive %.3f, permuted %.3f (%.1f s)",
        seed, blob["naive"]["barrier"], blob["permuted"]["barrier"], blob["seconds"],
    )  # fmt: skip


def _curves(exp: Experiment, model_a: nn.Module, model_b: nn.Module, pi: Permutation) -> dict:
    """The curves ``naive`` (A -> B) and ``permuted`` (pi(A) -> B), their ``seconds`` and the
    ``bn_samples`` each point's BatchNorm statistics were re-estimated on."""
    cfg = exp.cfg
    t0 = time.perf_counter()
    bn_data, bn_samples, bn_batches = exp.statistics_loader(), cfg.interp_bn_samples, None
    if bn_samples:  # equal batches of about bn_samples in all (not whole test-size batches)
        bn_batches = math.ceil(bn_samples / bn_data.batch_size)
        bn_data = bn_data.replace(batch_size=math.ceil(bn_samples / bn_batches))
    common = dict(
        bn_loader=bn_data, device=cfg.device, max_batches=cfg.interp_batches, bn_batches=bn_batches
    )
    alphas = torch.linspace(0, 1, cfg.interp_points).tolist()
    naive = interpolate(model_a, model_b, exp.test_loader, alphas=alphas, **common)
    inner = alphas[1:-1]  # the ends are shared: pi(A) computes A's function, and B is B
    moved = permute_model(model_a, pi, exp.graph)
    between = interpolate(moved, model_b, exp.test_loader, alphas=inner, **common) if inner else {}
    curves = {"naive": naive, "permuted": _with_ends(between, naive)}
    return {**curves, "seconds": time.perf_counter() - t0, "bn_samples": bn_samples}


def _with_ends(between: dict[str, Any], ends: dict[str, Any]) -> dict[str, Any]:
    """The curve through ``between``'s points with the ends of ``ends`` (same alphas)."""
    out = {}
    for key in ("alphas", "losses", "accs"):
        out[key] = [ends[key][0], *between.get(key, []), ends[key][-1]]
    out["barrier"] = barrier(out["alphas"], out["losses"])
    out["acc_barrier"] = barrier(out["alphas"], [-a for a in out["accs"]])
    return out


RUNNERS: dict[str, Callable[[Experiment, Stage], None]] = {
    "dense": _run_dense,
    "imp": _run_imp,
    "align": _run_align,
    "permuted masks": _run_permuted_masks,
    "sparse": _run_sparse,
    "interpolation": _run_interpolation,
}
