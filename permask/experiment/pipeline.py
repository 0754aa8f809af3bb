"""The paper's experiment, resumable stage by stage: :func:`run`.

Per seed (names as in the paper): dense A from w_A^0 keeping the rewind points k; IMP on A ->
m_A at every requested sparsity; dense B from w_B^0; align A to B -> pi and pi(m_A); sparse
training from k of naive (w_B^k * m_A), permuted (w_B^k * pi(m_A)) and LTH (w_A^k * m_A) with the
same recipe; the interpolation curves A -> B and pi(A) -> B. Then the report (see
:mod:`permask.experiment.report`).

Every stage writes into the run directory atomically (models through :func:`train`'s checkpoints,
each trained model's test softmax in ``eval.pt``, masks and permutations as safetensors). A
stage whose artifacts exist is skipped; an interrupted training resumes from its last epoch
checkpoint with identical results. Layout, for seed ``s``::

    config.yaml  run.log  results.{md,csv,json}  accuracy.png  interpolation.png
    seed<s>/dense_a/  seed<s>/dense_b/           epoch checkpoints, eval.pt
    seed<s>/imp/round<r>/  seed<s>/imp/s<sparsity>/eval.pt
    seed<s>/masks/{imp,permuted}_s<sparsity>.safetensors   seed<s>/align/pi.safetensors
    seed<s>/sparse/<method>_s<sparsity>_k<k>/    seed<s>/interpolation.json
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from permask._atomic import atomic_path, atomic_save, atomic_write_bytes
from permask.experiment.config import ConfigError, RunConfig
from permask.experiment.data import DataNotFoundError
from permask.experiment.distributed import World, init_world
from permask.experiment.layout import (
    a_seed,
    align_path,
    eval_path,
    imp_files,
    imp_round_dir,
    interpolation_path,
    seed_dir,
    sparse_dir,
)
from permask.experiment.loader import TensorLoader, get_loaders
from permask.experiment.models import build_model, check_model_name
from permask.experiment.report import Results, collect, write_report
from permask.experiment.train import (
    TrainResult,
    checkpoint_path,
    evaluate,
    load_checkpoint,
    predict_proba,
    train,
)
from permask.graph import Permutation, PermutationGraph, TraceError, trace
from permask.match import align
from permask.metrics import barrier, interpolate
from permask.permute import permute_mask, permute_model
from permask.sparse import ImpRound, Mask, imp, load_mask, save_mask

if TYPE_CHECKING:
    from permask.experiment.plan import Plan

__all__ = ["run", "prepare", "Experiment"]

METHODS = ("lth", "permuted", "naive")


@dataclass
class Experiment:
    """A validated config with its data loaded and model traced: ready to run, nothing trained."""

    cfg: RunConfig
    train_loader: TensorLoader
    test_loader: TensorLoader
    num_classes: int
    in_channels: int
    image_size: int
    log: logging.Logger
    world: World = World()  # this process among torchrun's; rank 0 writes and logs
    graph: PermutationGraph | None = None  # set by prepare()
    timings: dict[tuple[int, str], float] = field(default_factory=dict)  # (seed, stage) -> s

    @contextlib.contextmanager
    def timed(self, seed: int, stage: str) -> Iterator[None]:
        """Record the wall time of ``stage`` (named as in :mod:`permask.experiment.plan`)."""
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
        kw: dict[str, Any] = {}
        if cfg.model in ("resnet20", "vgg11"):
            kw["width"] = cfg.width
        if cfg.model == "vgg11":
            kw["batch_norm"] = cfg.batch_norm
        return build_model(cfg.model, self.num_classes, self.in_channels, self.image_size, **kw)

    def fit(
        self,
        model: nn.Module,
        loader: TensorLoader,
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
        )
        return train(model, loader, **{**recipe, **overrides}, checkpoint_dir=directory, desc=desc)

    def loader(self, seed: int) -> TensorLoader:
        """The training loader with its own data-order seed (shares the image tensors)."""
        loader = copy.copy(self.train_loader)
        loader.seed = seed
        return loader

    def statistics_loader(self, shard: bool = False) -> TensorLoader:
        """Training data for matching and BN statistics: shuffled, not augmented, big batches;
        this rank's share of each batch with ``shard`` (else all of it, as on one process)."""
        loader = self.loader(0)
        loader.augment = False
        loader.batch_size = self.test_loader.batch_size
        if not shard:
            loader.rank, loader.world_size = 0, 1
        return loader


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
    train_loader.rank, train_loader.world_size = world.rank, world.size
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
    saved = cfg.run_dir / "config.yaml"
    if not saved.is_file():
        return
    old = yaml.safe_load(saved.read_text()) or {}
    new = cfg.results_key()
    defaults = RunConfig().results_key()  # a setting added since that run: its default there
    old = {k: old.get(k, defaults.get(k)) for k in new}
    diff = [k for k in new if old[k] != new[k]]
    if diff:
        k = diff[0]
        raise ConfigError(
            f"{cfg.run_dir} holds a run with other settings ({k}: {old[k]!r} there, "
            f"{new[k]!r} now); use another --out"
        )


def run(cfg: RunConfig) -> Results:
    """Run (or resume) the whole experiment; return the results table (also written to disk)."""
    exp = prepare(cfg)
    start = time.perf_counter()
    out, world = cfg.run_dir, exp.world
    if world.main:  # rank 0 alone writes the run directory and the log
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # a file there, no permission, a read-only file system
            raise ConfigError(f"cannot create the run directory {out}: {err}") from None
        saved = yaml.safe_dump(cfg.results_key(), sort_keys=False)
        atomic_write_bytes(saved.encode(), out / "config.yaml")
    handler = _attach_log(exp.log, out / "run.log" if world.main else None)
    world.barrier()
    try:
        exp.log.info(
            "run %s: %s on %s, %d seed(s), device %s%s",
            out, cfg.model, cfg.dataset, cfg.seeds, exp.cfg.device,
            f", {world.size} processes" if world.active else "",
        )  # fmt: skip
        from permask.experiment.plan import plan  # it imports this module (layout helpers)

        todo = plan(exp)
        exp.log.info("plan: %s", todo.summary())
        for seed in range(cfg.seeds):
            _run_seed(exp, seed)
        results = collect(out, cfg, exp.test_loader.labels.cpu(), exp.num_classes)
        results.stages = _stage_times(todo, exp.timings)
        if world.main:
            write_report(out, cfg, results, time.perf_counter() - start)
        world.barrier()
        for note in results.notes:
            exp.log.warning(note)
        exp.log.info(
            "results in %s (%.1f min this invocation)",
            out / "results.md",
            (time.perf_counter() - start) / 60,
        )
    finally:
        exp.log.removeHandler(handler)
        handler.close()
    return results


def _stage_times(todo: Plan, timings: dict[tuple[int, str], float]) -> list[dict[str, Any]]:
    """Each stage this invocation ran: the plan's estimate beside the time it took."""
    return [
        {"seed": s.seed, "stage": s.name, "estimate_seconds": s.seconds(todo.probe),
         "seconds": timings.get((s.seed, s.name))}
        for s in todo.todo
    ]  # fmt: skip


def _attach_log(log: logging.Logger, path: Path | None) -> logging.Handler:
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


def _seeds(seed: int) -> dict[str, int]:
    """Init and data-order seeds of one repeat (distinct across roles and repeats)."""
    base = 1000 * seed
    return {"a": base + 1, "b": base + 2, "sparse": base + 3, "imp": base + 4}


def _run_seed(exp: Experiment, seed: int) -> None:
    cfg = exp.cfg
    seed_of_a = a_seed(cfg, seed)  # the seed whose A serves this one (0 with shared_a)
    own_dir = seed_dir(cfg.run_dir, seed)  # B and the rest
    a_dir = seed_dir(cfg.run_dir, seed_of_a)  # A and IMP
    a_seeds, own_seeds = _seeds(seed_of_a), _seeds(seed)
    keep_a = set(cfg.rewind)  # IMP's rewinding variant rewinds to rewind[0]
    timed = functools.partial(exp.timed, seed)  # the stages' names are the plan's

    def dense(role: str, owner: int, directory: Path, seeds: dict[str, int], keep: set[int]):
        with timed(f"dense {role}"):
            init = seeds[role.lower()]
            model, loader = exp.build(init), exp.loader(init)
            return _trained(
                exp, f"[seed {owner}] dense {role}", directory, model, loader, keep=keep
            )

    model_a = dense("A", seed_of_a, a_dir / "dense_a", a_seeds, keep_a)
    with timed("IMP"):
        masks = _imp(exp, seed_of_a, a_dir, model_a, a_seeds)
    keep_b = {*cfg.rewind} | ({cfg.match_epoch} if cfg.match_epoch is not None else set())
    model_b = dense("B", seed, own_dir / "dense_b", own_seeds, keep_b)
    with timed("align"):
        pi = _align(exp, seed, own_dir, model_a, model_b)
    permuted = _permuted_masks(exp, own_dir, masks, pi)
    for s in cfg.sparsity:
        for k in cfg.rewind:
            if cfg.sparse_schedule == "restart":
                schedule = dict(epochs=cfg.epochs - k, lr=cfg.sparse_lr or cfg.lr)
            else:  # the dense schedule resumed at k
                schedule = dict(start_epoch=k)
            starts = {
                "lth": (a_dir / "dense_a", masks[s]),
                "permuted": (own_dir / "dense_b", permuted[s]),
                "naive": (own_dir / "dense_b", masks[s]),
            }
            for method in METHODS:
                src, mask = starts[method]
                model = exp.build(0)
                load_checkpoint(checkpoint_path(src, k), model)
                stage = f"{method} s={s:g} k={k}"
                with timed(stage):
                    _trained(
                        exp,
                        f"[seed {seed}] {stage}",
                        sparse_dir(own_dir, method, s, k),
                        model,
                        exp.loader(own_seeds["sparse"]),
                        mask=mask,
                        **schedule,
                    )
    with timed("interpolation"):
        _interpolation(exp, seed, own_dir, model_a, model_b, pi)


def _trained(
    exp: Experiment,
    name: str,
    directory: Path,
    model: nn.Module,
    loader: TensorLoader,
    *,
    start_epoch: int = 0,
    mask: Mask | None = None,
    keep: Iterable[int] = (),
    **recipe: Any,
) -> nn.Module:
    """Train ``model`` into ``directory`` (resuming), evaluate it once; skip if done earlier.
    ``recipe`` overrides the run's training settings (e.g. ``epochs``, ``lr``)."""
    cfg = exp.cfg
    done = eval_path(directory)
    if exp.world.exists(done):
        load_checkpoint(checkpoint_path(directory), model)
        exp.log.info("%s: done earlier (skipped)", name)
        return model
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
    acc = _evaluate_into(exp, model, done, time.perf_counter() - t0, result.resumed_from)
    resumed = f", resumed at epoch {result.resumed_from}" if result.resumed_from else ""
    exp.log.info(
        "%s: test acc %.2f%% (%.1f s%s)", name, 100 * acc, time.perf_counter() - t0, resumed
    )
    return model


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


def _imp(
    exp: Experiment, seed: int, a_dir: Path, model_a: nn.Module, seeds: dict[str, int]
) -> dict[float, Mask]:
    """IMP on (a copy of) trained A; masks and evaluations at every requested sparsity."""
    cfg = exp.cfg
    paths, evals = imp_files(cfg, a_dir)
    if exp.world.exists(*paths.values(), *evals.values()):
        exp.log.info("[seed %d] IMP: done earlier (skipped)", seed)
        return {s: load_mask(p, cfg.device) for s, p in paths.items()}
    k = cfg.rewind[0]
    rewind = None
    if cfg.imp == "rewind":
        ckpt = load_checkpoint(checkpoint_path(a_dir / "dense_a", k), map_location=cfg.device)
        rewind = ckpt["model"]

    def train_fn(model: nn.Module, mask: Mask, r: int) -> None:
        round_dir, desc = imp_round_dir(a_dir, r), f"IMP round {r}"
        if cfg.imp == "rewind":
            exp.fit(model, exp.loader(seeds["a"]), round_dir, desc, start_epoch=k, mask=mask)
        else:
            loader = exp.loader(seeds["imp"] + r)
            recipe = dict(epochs=cfg.finetune_epochs, lr=cfg.finetune_lr, schedule="cosine")
            exp.fit(model, loader, round_dir, desc, mask=mask, **recipe)

    t0 = time.perf_counter()
    masks: dict[float, Mask] = {}
    show = cfg.progress and exp.world.main
    bar = tqdm(desc=f"[seed {seed}] IMP rounds", leave=False, disable=not show)

    def on_round(done: ImpRound) -> None:
        bar.total = done.rounds
        bar.update()
        for target in done.targets:
            exp.world.check_same(f"the {target:g} IMP mask", done.mask)  # identical weights
            masks[target] = done.mask
            exp.world.written_by_main(_save_mask, done.mask, paths[target])
            acc = _evaluate_into(exp, model, evals[target], time.perf_counter() - t0)
            msg = "[seed %d] IMP %.4g%% (round %d/%d): test acc %.2f%% (%.1f s)"
            dt = time.perf_counter() - t0
            exp.log.info(msg, seed, 100 * target, done.round, done.rounds, 100 * acc, dt)

    model = copy.deepcopy(model_a)
    with bar:
        imp(
            model, train_fn, cfg.sparsity, rate=cfg.imp_rate, rewind_state=rewind,
            dense_shortcuts=cfg.dense_shortcuts, on_round=on_round,
        )  # fmt: skip
    return masks


def _align(
    exp: Experiment, seed: int, own_dir: Path, model_a: nn.Module, model_b: nn.Module
) -> Permutation:
    """pi moving A into B's basin (B at ``match_epoch`` if set), saved as safetensors."""
    cfg = exp.cfg
    path = align_path(own_dir)
    if exp.world.exists(path):
        exp.log.info("[seed %d] align: done earlier (skipped)", seed)
        return Permutation.load(path)
    t0 = time.perf_counter()
    target = model_b
    if cfg.match_epoch is not None:
        target = exp.build(0)
        load_checkpoint(checkpoint_path(own_dir / "dense_b", cfg.match_epoch), target)
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
    exp.world.written_by_main(_save_atomically, pi.save, path)
    when = f" (B at epoch {cfg.match_epoch})" if cfg.match_epoch is not None else ""
    exp.log.info(
        "[seed %d] align (%s matching%s): %.1f s", seed, cfg.match, when, time.perf_counter() - t0
    )
    return pi


def _permuted_masks(
    exp: Experiment, own_dir: Path, masks: dict[float, Mask], pi: Permutation
) -> dict[float, Mask]:
    out = {}
    for s, mask in masks.items():
        path = own_dir / "masks" / f"permuted_s{s:g}.safetensors"
        if exp.world.exists(path):  # decided before rank 0 writes it below
            out[s] = load_mask(path, exp.cfg.device)
            continue
        out[s] = permute_mask(mask, pi, exp.graph)
        exp.world.written_by_main(_save_mask, out[s], path)
    return out


def _save_mask(mask: Mask, path: Path) -> None:
    _save_atomically(functools.partial(save_mask, mask), path)


def _save_atomically(save: Callable[[Path], object], path: Path) -> None:
    """``save(tmp)`` into a temporary path that replaces ``path`` once complete."""
    with atomic_path(path) as tmp:
        save(tmp)


def _interpolation(
    exp: Experiment,
    seed: int,
    own_dir: Path,
    model_a: nn.Module,
    model_b: nn.Module,
    pi: Permutation,
) -> None:
    """Loss/accuracy along A -> B (naive) and pi(A) -> B (aligned), with barriers."""
    cfg = exp.cfg
    path = interpolation_path(own_dir)
    if exp.world.exists(path):
        exp.log.info("[seed %d] interpolation: done earlier (skipped)", seed)
        return
    t0 = time.perf_counter()
    bn_data, bn_samples, bn_batches = exp.statistics_loader(), cfg.interp_bn_samples, None
    if bn_samples:  # equal batches of about bn_samples in all (not whole test-size batches)
        bn_batches = math.ceil(bn_samples / bn_data.batch_size)
        bn_data.batch_size = math.ceil(bn_samples / bn_batches)
    common = dict(
        bn_loader=bn_data, device=cfg.device, max_batches=cfg.interp_batches, bn_batches=bn_batches
    )
    alphas = torch.linspace(0, 1, cfg.interp_points).tolist()
    naive = interpolate(model_a, model_b, exp.test_loader, alphas=alphas, **common)
    inner = alphas[1:-1]  # the ends are shared: pi(A) computes A's function, and B is B
    moved = permute_model(model_a, pi, exp.graph)
    between = interpolate(moved, model_b, exp.test_loader, alphas=inner, **common) if inner else {}
    curves = {"naive": naive, "permuted": _with_ends(between, naive)}
    seconds = time.perf_counter() - t0
    blob = json.dumps({**curves, "seconds": seconds, "bn_samples": bn_samples}, indent=1)
    exp.world.written_by_main(atomic_write_bytes, blob.encode(), path)  # the same on every rank
    exp.log.info(
        "[seed %d] interpolation: loss barrier naive %.3f, permuted %.3f (%.1f s)",
        seed, naive["barrier"], curves["permuted"]["barrier"], seconds,
    )  # fmt: skip


def _with_ends(between: dict[str, Any], ends: dict[str, Any]) -> dict[str, Any]:
    """The curve through ``between``'s points with the ends of ``ends`` (same alphas)."""
    out = {}
    for key in ("alphas", "losses", "accs"):
        out[key] = [ends[key][0], *between.get(key, []), ends[key][-1]]
    out["barrier"] = barrier(out["alphas"], out["losses"])
    out["acc_barrier"] = barrier(out["alphas"], [-a for a in out["accs"]])
    return out
