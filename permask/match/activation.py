"""One-pass activation statistics: A-vs-B channel correlations at every observation point.

Correlations between A's and B's channels of one group do not depend on how other groups are
permuted, so one pass over the data serves every group at once (the paper's code re-runs the data
once per layer). A and B run *in lockstep* through one ``torch.fx.GraphModule`` built from the
traced graph: every node of A, then the same node of B, and right after an observed node the
statistics of both outputs are taken, before any later (possibly in-place) op can change them.
No activation is kept: extra memory is one observed activation pair at a time, not every
observation point of a batch (tens of GB for an ImageNet ResNet50 batch of 256), and its copies
are made in equal slices of rows of at most ``_CHUNK_ELEMENTS`` (an LLM batch of 4096 tokens x
5632 MLP channels: two slices).

Per unit we accumulate, in float64 on the models' device, the sample count and sums of a, b,
a^2, b^2 and the cross sum a^T b; then ``corr = cov / (std_a std_b)``, the plain correlation:
independent of the activations' scale, 0 where either channel is constant (not NaN), and
clamped to [-1, 1], since for a channel constant up to rounding ``cov`` keeps a rounding
residue while ``var`` rounds to 0 (unclamped, such a pair's score is unbounded and outweighs
every true pair of its group). Elements the data cannot order
(constant, or tied: several partners equally good) are re-matched by their weights
(:func:`permask.match.alignment.align`), so ties are settled the same way by one process and
by several. No regulariser is added to the denominator: the paper's (REPAIR) ``std_a std_b +
1e-4`` assumes activations of about unit scale; where they are ~1e-2 (random inits, deep
squeeze-excitation blocks) the score becomes a covariance, which prefers high-variance
channels to the true partner. A regulariser relative to the unit's scale still cuts the score
of a quiet channel's true partner (a channel whose only variation is zero padding around a
constant map correlates 1 with its partner) below that of a louder look-alike. What each
denominator did on planted permutations: docs/history.md, "Activation matching's score".

Precision: each batch's products are formed in the activations' dtype (a float32 GEMM is about
twice as fast as a float64 one on CPU) and added to float64 accumulators. Values are first
shifted by a per-channel constant (the first batch's mean), so the sums are of centred-ish values
and ``cov = E[ab] - E[a]E[b]`` does not cancel catastrophically. Half-precision activations
(AMP) are promoted to float32 in that same shifting pass. The cross products follow torch's
float32 matmul setting unless ``precision`` says otherwise, on CUDA: ``"high"`` allows TF32
(10-bit mantissas in, float32 sums out, on tensor cores), ``"highest"`` forbids it. On a CPU the
products are float32 either way. bfloat16 products are not offered: no faster than TF32 once
the extra rounding pass is paid, and less accurate (docs/benchmarks.md, "ResNet50 at ImageNet
scale on one GPU").

Speed: the shifted copy keeps the activation's own layout, viewed as ``[before, channels,
after]`` (``N x C x HW`` for a conv): moving channels last is a transposing copy that costs more
than the cross product itself on early conv layers. The cross sum is then one GEMM when nothing
follows the channels (tokens, linear layers), a batched GEMM over ``before`` when many positions
follow them (early conv layers), and a GEMM on a channels-last copy otherwise (late, wide conv
layers), the faster of the two there (docs/benchmarks.md, "Alignment").
"""

from __future__ import annotations

import copy
import functools
import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .._modules import model_device
from ..graph.capture import fx_capture
from .points import Plan, Point, Unit

__all__ = ["paired_module", "CorrelationStats"]


_BMM_ELEMENTS = 2**24  # bound on a batched cross product's [chunk, C, C] intermediate
# bound on one copy of a unit's values and on one block of the cross product (64 MiB of
# float32), cut into equal slices: an LLM batch of 4096 tokens x 5632 channels is observed in
# two slices of rows. Smaller slices peaked higher on a 1.1B Llama (the allocator keeps them)
_CHUNK_ELEMENTS = 2**24
_PRODUCT_DTYPES = (torch.float32, torch.float64)  # others (AMP's half types) become float32
PRECISIONS = (None, "highest", "high")
_TINY = torch.finfo(torch.float64).tiny
# CUDA: per-channel sum and sum of squares from one Welford pass (torch.var_mean) instead of
# three (sum, square, sum); on the CPU var_mean is slower than those three (docs/benchmarks.md,
# "ResNet50 at ImageNet scale on one GPU")
FUSED_MOMENTS = {"cuda": True}


def check_precision(precision: str | None) -> None:
    """A ``ValueError`` naming the choices unless ``precision`` is one of :data:`PRECISIONS`."""
    if precision not in PRECISIONS:
        raise ValueError(
            f"unknown precision {precision!r}; choose 'highest' (float32 products), 'high' (TF32 "
            "products on CUDA) or None (torch's float32 matmul setting)"
        )


def _product_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.dtype in _PRODUCT_DTYPES else torch.float32


def _as_3d(x: torch.Tensor, axis: int) -> torch.Tensor:
    """``x`` viewed as ``[before, channels, after]`` around axis ``axis`` (detached)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"observed node returned {type(x).__name__}, not a tensor")
    x = x.detach()
    return x.reshape(math.prod(x.shape[:axis]), x.shape[axis], -1)


def _row_chunks(x: torch.Tensor) -> Iterator[torch.Tensor]:
    """``x`` (``[before, C, after]``) in the fewest equal slices of leading rows of at most
    :data:`_CHUNK_ELEMENTS` elements (at least one row each): what one unit copy holds."""
    step = _even(x.shape[0], _CHUNK_ELEMENTS // max(1, x.shape[1] * x.shape[2]))
    for start in range(0, x.shape[0], step):
        yield x[start : start + step]


def _even(n: int, most: int) -> int:
    """The length of the fewest equal slices of ``n`` items of at most ``most`` (at least 1)."""
    slices = -(-n // max(1, most))
    return -(-n // slices)


def _unit_values(
    x: torch.Tensor, idx: torch.Tensor | None, shift: torch.Tensor | None
) -> torch.Tensor:
    """A fresh floating-point ``[before, n, after]`` copy of a unit's channels of ``x``
    (``[before, C, after]``) minus ``shift`` (per unit element); a unit's replicas count as
    samples."""
    if idx is not None:  # gathering copies: [before, k, n, after] -> [before * k, n, after]
        x = x[:, idx].reshape(-1, idx.shape[-1], x.shape[-1]).to(_product_dtype(x))
        return x if shift is None else x.sub_(shift)
    if shift is not None:  # one pass: float32 shift, so bfloat16/float16 values promote
        return x - shift
    return x.clone() if x.dtype in _PRODUCT_DTYPES else x.float()


def _add_cross(sab: torch.Tensor, a: torch.Tensor, b: torch.Tensor, precision: str | None) -> None:
    """Add to ``sab`` the ``[C, C]`` sums of ``a[., i, .] * b[., j, .]`` for ``[before, C,
    after]`` inputs, products at ``precision`` (CUDA; see :class:`CorrelationStats`). Made in
    blocks of ``sab``'s rows of at most :data:`_CHUNK_ELEMENTS`, and straight into ``sab`` when
    it has the products' dtype: no ``C x C`` temporary (an LLM's MLP unit: 127 MB)."""
    before, c, after = a.shape
    with _matmul_precision(precision, a.device):
        if after > 1 and after >= c:  # many positions per channel, few channels (early convs)
            chunk = max(1, _BMM_ELEMENTS // (c * c))
            for i in range(0, before, chunk):
                sab += torch.bmm(a[i : i + chunk], b[i : i + chunk].transpose(1, 2)).sum(0)
            return
        if after > 1:  # channels last: one GEMM beats a batched one on late, wide layers
            a, b = (x.transpose(1, 2).reshape(-1, c) for x in (a, b))
        else:
            a, b = a.view(before, c), b.view(before, c)
        step = _even(c, _CHUNK_ELEMENTS // c)
        for r in range(0, c, step):
            if sab.dtype == a.dtype:
                sab[r : r + step].addmm_(a[:, r : r + step].T, b)
            else:
                sab[r : r + step] += a[:, r : r + step].T @ b


def _add_moments(x: torch.Tensor, s: torch.Tensor, ss: torch.Tensor) -> None:
    """Add the per-channel sums of ``x`` and of its squares (``[before, C, after]``) to ``s``
    and ``ss`` (float64, or float32)."""
    if FUSED_MOMENTS.get(x.device.type, False):
        var, mean = torch.var_mean(x, dim=(0, 2), correction=0)
        m = x.shape[0] * x.shape[2]
        mean = mean.to(s.dtype)
        s += mean * m
        ss += (var.to(s.dtype) + mean.square()) * m
    else:
        s += x.sum((0, 2))
        ss += x.square().sum((0, 2))


@contextmanager
def _matmul_precision(precision: str | None, device: torch.device) -> Iterator[None]:
    """``torch.set_float32_matmul_precision(precision)`` for CUDA products inside the block
    (``None``: torch's setting as it is; a CPU's float32 products are float32 either way)."""
    if precision is None or device.type != "cuda":
        yield
        return
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def _reshift(sums: list[torch.Tensor], count: int, da: torch.Tensor, db: torch.Tensor) -> None:
    """Sums of ``a - c``, ``b - d`` (``[sa, sb, saa, sbb, sab]``) to sums of ``a - c'``,
    ``b - d'`` in place, with ``da = c - c'`` and ``db = d - d'``."""
    sa, sb, saa, sbb, sab = sums
    sab += torch.outer(da, sb) + torch.outer(sa, db) + count * torch.outer(da, db)
    saa += 2 * da * sa + count * da.square()
    sbb += 2 * db * sb + count * db.square()
    sa += count * da
    sb += count * db


class _Observer(nn.Module):
    """Calls ``stats.observe`` from inside the paired graph (a module, so fx can call it).

    It holds the statistics by a weak reference: an fx module and its graph refer to each other,
    so the paired module lives until the garbage collector runs, and a strong reference would
    keep a pass's statistics (gigabytes for an LLM) alive into the next passes."""

    def __init__(self, stats: CorrelationStats):
        super().__init__()
        self.stats = weakref.ref(stats)

    def forward(self, point: int, a: torch.Tensor, b: torch.Tensor) -> None:
        self.stats().observe(point, a, b)


def _own_copy(x: Any) -> Any:
    """B's copy of an input, so that an in-place op of A on its input cannot reach B."""
    return x.clone() if isinstance(x, torch.Tensor) else x


def paired_module(
    model_a: nn.Module, model_b: nn.Module, fx_graph: fx.Graph, stats: CorrelationStats
) -> fx.GraphModule:
    """One module running ``model_a`` and ``model_b`` node by node through the traced graph,
    feeding ``stats`` right after every observed node. Returns nothing, and stops at the last
    observed node (an LLM's logits are never computed).

    It shares both models' submodules and parameters (nothing is copied).
    """
    root = nn.Module()
    root.add_module("a", model_a)
    root.add_module("b", model_b)
    root.add_module("observe", _Observer(stats))
    root.add_module("consts", nn.Module())
    real: dict[str, fx.GraphModule] = {}  # a trace of the real model_a, made when needed
    at: dict[str, list[int]] = {}
    for i, p in enumerate(stats.plan.points):
        at.setdefault(p.node, []).append(i)
    graph = fx.Graph()
    env_a: dict[fx.Node, fx.Node] = {}
    env_b: dict[fx.Node, fx.Node] = {}
    left = len(at)  # observed nodes still to come: none, and the rest cannot reach the stats
    for node in fx_graph.nodes:
        if node.op == "output" or (left == 0 and node.op != "placeholder"):
            continue
        left -= node.name in at
        if node.op == "placeholder":
            env_a[node] = graph.node_copy(node)
            env_b[node] = graph.call_function(_own_copy, (env_a[node],))
            continue
        if node.op == "get_attr" and not _has_attr(model_a, node.target):
            # a tensor constant made inside forward at trace time (a relative position index):
            # the architecture's, so one copy serves both models
            const = _constant(fx_graph, node.target, model_a, real)
            name = f"const_{len(root.consts._buffers)}"
            root.consts.register_buffer(name, const.to(model_device(model_a)), persistent=False)
            env_a[node] = env_b[node] = graph.get_attr(f"consts.{name}")
            continue
        for env, prefix in ((env_a, "a."), (env_b, "b.")):
            target = prefix + node.target if node.op in ("call_module", "get_attr") else node.target
            args = fx.map_arg(node.args, env.__getitem__)
            kwargs = fx.map_arg(node.kwargs, env.__getitem__)
            env[node] = graph.create_node(node.op, target, args, kwargs)
        for i in at.get(node.name, ()):
            graph.call_module("observe", (i, env_a[node], env_b[node]))
    graph.output(None)
    return fx.GraphModule(root, graph)


def _constant(
    fx_graph: fx.Graph, target: str, model_a: nn.Module, real: dict[str, fx.GraphModule]
) -> torch.Tensor:
    """The tensor constant ``target`` of the traced graph's own module. The fx front end traces
    a copy on the meta device where it can, so its constants may hold no data: then they are
    taken from a trace of the real ``model_a`` (made once, into ``real``), the same code with
    the same constants in the same order, checked by shape and dtype."""
    owner = fx_graph.owning_module
    value = getattr(owner, target, None) if owner is not None else None
    if isinstance(value, torch.Tensor) and value.is_meta:
        if "gm" not in real:
            n_inputs = sum(n.op == "placeholder" for n in fx_graph.nodes)
            real["gm"] = fx_capture(copy.deepcopy(model_a).eval(), n_inputs)
        found = getattr(real["gm"], target, None)
        same = isinstance(found, torch.Tensor) and found.shape == value.shape
        value = found if same and found.dtype == value.dtype else None
    if not isinstance(value, torch.Tensor):
        raise NotImplementedError(
            f"the traced graph reads '{target}', which neither model_a nor the traced graph's "
            "module holds as a tensor; use method='weight'"
        )
    return value


def _has_attr(module: nn.Module, target: str) -> bool:
    try:
        functools.reduce(getattr, target.split("."), module)
    except AttributeError:
        return False
    return True


class CorrelationStats:
    """Streaming sums (float64, or ``dtype``) for every unit of a plan; :meth:`scores` gives
    correlations."""

    def __init__(
        self, plan: Plan, device: torch.device, precision: str | None = None,
        dtype: torch.dtype = torch.float64,
    ):  # fmt: skip
        check_precision(precision)
        self.plan = plan
        self.precision = precision
        self.count = [[0] * len(p.units) for p in plan.points]
        self.sums: list[list[list[torch.Tensor]]] = []
        for p in plan.points:
            per_unit = []
            for u in p.units:
                n = u.size
                vecs = [torch.zeros(n, dtype=dtype, device=device) for _ in range(4)]
                per_unit.append([*vecs, torch.zeros(n, n, dtype=dtype, device=device)])
            self.sums.append(per_unit)
        self.index = [[_gather_index(u, p, device) for u in p.units] for p in plan.points]
        self.shift: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.spent = False

    def observe(self, point: int, xa: torch.Tensor, xb: torch.Tensor) -> None:
        """Add one batch of point ``point``: the observed outputs of A and B (left untouched)."""
        device_type = xa.device.type if isinstance(xa, torch.Tensor) else "cpu"
        with torch.autocast(device_type, enabled=False):  # float32 products under AMP too
            self._observe(point, xa, xb)

    def _observe(self, point: int, xa: torch.Tensor, xb: torch.Tensor) -> None:
        axis, mixed = self.plan.points[point].axis, self.plan.points[point].mixed
        if mixed:  # other axes in different orders in A and B: averaged out (points.py)
            xa, xb = (x.mean(mixed, keepdim=True, dtype=_product_dtype(x)) for x in (xa, xb))
        xa, xb = _as_3d(xa, axis), _as_3d(xb, axis)
        for j, idx in enumerate(self.index[point]):
            sa, sb, saa, sbb, sab = self.sums[point][j]
            for ca, cb in zip(_row_chunks(xa), _row_chunks(xb)):  # bounded copies
                shift = self.shift.get((point, j))
                a = _unit_values(ca, idx, None if shift is None else shift[0])
                b = _unit_values(cb, idx, None if shift is None else shift[1])
                if shift is None:  # the first chunk's mean is the shift from now on
                    shift = (a.mean((0, 2))[:, None], b.mean((0, 2))[:, None])
                    self.shift[(point, j)] = shift
                    a.sub_(shift[0])
                    b.sub_(shift[1])
                _add_moments(a, sa, saa)
                _add_moments(b, sb, sbb)
                _add_cross(sab, a, b, self.precision)
                self.count[point][j] += a.shape[0] * a.shape[2]

    def all_reduce(self) -> None:
        """Sum every process's statistics in place (``torch.distributed``; each rank streamed its
        own shard). Each rank's sums are first moved, exactly in float64, from its own shift (its
        first batch's mean) to one common shift, the mean of the ranks' shifts; so the result is
        that of one process streaming every shard."""
        import torch.distributed as dist

        for i, p in enumerate(self.plan.points):
            for j in range(len(p.units)):
                sums, shift = self.sums[i][j], self.shift.get((i, j))
                n, device = sums[0].numel(), sums[0].device
                own = None if shift is None else torch.cat([s.flatten() for s in shift]).double()
                shared = torch.zeros(2 * n + 2, dtype=torch.float64, device=device)
                if own is not None:  # [shift of A, shift of B, 1 (a rank with data), count]
                    shared[: 2 * n] = own
                    shared[2 * n] = 1
                shared[-1] = self.count[i][j]
                dist.all_reduce(shared)
                if shared[2 * n] == 0:  # no rank observed this point
                    continue
                common = shared[: 2 * n] / shared[2 * n]
                if own is not None:
                    delta = own - common
                    _reshift(sums, self.count[i][j], delta[:n], delta[n:])
                for t in sums:
                    dist.all_reduce(t)
                self.count[i][j] = int(shared[-1])
                dtype = shift[0].dtype if shift is not None else torch.float32
                self.shift[(i, j)] = (common[:n, None].to(dtype), common[n:, None].to(dtype))

    def check_finite(self) -> None:
        """Raise ``FloatingPointError`` naming the first point whose activations were not finite."""
        for i, p in enumerate(self.plan.points):
            for j in range(len(p.units)):
                sa, sb, saa, sbb, sab = self.sums[i][j]
                for model, s, ss in (("model_a", sa, saa), ("model_b", sb, sbb)):
                    if not (torch.isfinite(s).all() and torch.isfinite(ss).all()):
                        raise FloatingPointError(
                            f"{model} produced NaN/inf activations at node '{p.node}' "
                            f"({p.target}); check the model's weights and inputs"
                        )
                # one pass, no n x n temporaries: float64 sums of float32-range values cannot
                # overflow, so the sum is finite exactly when every entry is
                if not torch.isfinite(sab.sum(dtype=torch.float64)):
                    raise FloatingPointError(
                        f"the A-B cross products at node '{p.node}' ({p.target}) overflowed "
                        "float32; the activations there are too large"
                    )

    def _moments(
        self, i: int, j: int
    ) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Count, means and standard deviations of A's and B's (shifted) values at unit j of
        point i."""
        if self.spent:
            raise RuntimeError("these statistics were spent by scores(spend=True); observe the "
                               "data again for new ones")  # fmt: skip
        n = self.count[i][j]
        sa, sb, saa, sbb, _ = self.sums[i][j]
        ma, mb = sa / n, sb / n
        std_a = (saa / n - ma * ma).clamp_min(0).sqrt()
        std_b = (sbb / n - mb * mb).clamp_min(0).sqrt()
        return n, ma, mb, std_a, std_b

    def scores(self, spend: bool = False) -> dict[tuple[str, ...], torch.Tensor]:
        """Correlation matrices ``[n_a, n_b]`` per unit key, summed over observation points:
        ``cov / (std_a std_b)`` clamped to [-1, 1], 0 where either std is 0 (module
        docstring). With ``spend=True`` they are made in the statistics' own cross-sum
        buffers, so no second ``n x n`` matrix per unit is needed, and the statistics are
        spent: reading them again raises."""
        return self._summed(correlation=True, spend=spend)

    def covariances(self) -> dict[tuple[str, ...], torch.Tensor]:
        """Cross-covariance matrices ``[n_a, n_b]`` of A's and B's values per unit key, summed
        over observation points."""
        return self._summed(correlation=False)

    def _summed(
        self, correlation: bool, spend: bool = False
    ) -> dict[tuple[str, ...], torch.Tensor]:
        out: dict[tuple[str, ...], torch.Tensor] = {}
        for i, p in enumerate(self.plan.points):
            for j, u in enumerate(p.units):
                n, ma, mb, std_a, std_b = self._moments(i, j)
                sab = self.sums[i][j][4]
                corr = (sab.div_(n) if spend else torch.div(sab, n)).addr_(ma, mb, alpha=-1)
                if correlation:
                    _normalise(corr, std_a, std_b)
                if u.groups in out:
                    out[u.groups] += corr
                else:
                    out[u.groups] = corr
                if spend:  # this unit's sums are gone; its buffer lives on in out, or is freed
                    self.sums[i][j] = []
        self.spent = spend
        return out

    def _varied(self, i: int, j: int, rtol: float) -> tuple[torch.Tensor, torch.Tensor]:
        """A's and B's elements that varied at unit j of point i (:meth:`live`), on the device."""
        _, ma, mb, std_a, std_b = self._moments(i, j)
        shifts = self.shift.get((i, j), (None, None))  # add the shift back to the means
        flags = []
        for m, std, s in zip((ma, mb), (std_a, std_b), shifts):
            mean = m if s is None else m + s.flatten().to(m.dtype)
            flags.append(std > rtol * (mean.abs() + std.max()))
        return flags[0], flags[1]

    def constant(self, rtol: float = 1e-6) -> dict[tuple[str, ...], tuple[int, int]]:
        """Per unit key, how many of A's and of B's elements were constant (:meth:`live`)."""
        return constant_counts(self.live(rtol))

    def live(self, rtol: float = 1e-6) -> dict[tuple[str, ...], list[torch.Tensor]]:
        """Per unit key, A's and B's elements that varied at some observation point (flags on
        the CPU). The others were constant (a ReLU that never fired, say): their correlations
        are all 0, so the data gives them no order. Constant means a standard deviation at most
        ``rtol`` times the element's mean magnitude plus the unit's largest standard deviation:
        about 16 float32 steps of the mean, so rounding of a constant is caught and any real
        variation (which the correlations do order) is not."""
        live: dict[tuple[str, ...], list[torch.Tensor]] = {}
        for i, p in enumerate(self.plan.points):
            for j, u in enumerate(p.units):
                flags = self._varied(i, j, rtol)
                if u.groups in live:
                    live[u.groups] = [x | f.cpu() for x, f in zip(live[u.groups], flags)]
                else:
                    live[u.groups] = [f.cpu() for f in flags]
        return live


def _normalise(corr: torch.Tensor, std_a: torch.Tensor, std_b: torch.Tensor) -> None:
    """``corr / outer(std_a, std_b)`` in place, clamped to [-1, 1], 0 where either std is 0; in
    blocks of rows, so no ``n x n`` denominator is made whole."""
    step = max(1, (1 << 22) // max(1, corr.shape[1]))
    for start in range(0, corr.shape[0], step):
        block = corr[start : start + step]
        denom = torch.outer(std_a[start : start + step], std_b)
        block.div_(denom.clamp_min(_TINY)).clamp_(-1.0, 1.0)
        block.masked_fill_(denom == 0, 0.0)


def constant_counts(
    live: dict[tuple[str, ...], list[torch.Tensor]],
) -> dict[tuple[str, ...], tuple[int, int]]:
    """Per unit key, how many of A's and of B's elements are not live (:meth:`live` flags)."""
    return {k: (int((~a).sum()), int((~b).sum())) for k, (a, b) in live.items()}


def group_live(
    live: dict[tuple[str, ...], list[torch.Tensor]], sizes: dict[str, int]
) -> dict[str, list[torch.Tensor]]:
    """Per group, A's and B's elements that are live (:meth:`CorrelationStats.live`) in some
    unit: inside blocks x within, a block is live if any of its elements is, and a within
    element if it is in any block (one within order serves every block)."""
    out: dict[str, list[torch.Tensor]] = {}
    for chain, flags in live.items():
        shape = [sizes[g] for g in chain]
        for k, g in enumerate(chain):
            others = [d for d in range(len(chain)) if d != k]
            per = [f.reshape(shape).any(others) if others else f for f in flags]
            out[g] = [x | f for x, f in zip(out[g], per)] if g in out else per
    return out


def _gather_index(unit: Unit, point: Point, device: torch.device) -> torch.Tensor | None:
    """Column index ``[k, n]`` into the point's channels, or None when it is all of them."""
    if unit.index.shape[0] == 1 and torch.equal(unit.index[0], torch.arange(point.size)):
        return None
    return unit.index.to(device)
