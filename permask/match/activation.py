"""One-pass activation statistics: A-vs-B channel correlations at every observation point.

Correlations between A's and B's channels of one group do not depend on how other groups are
permuted, so one pass over the data serves every group at once (the paper's code re-runs the data
once per layer). Both models run as ``torch.fx.GraphModule`` s over the traced graph; a copy of
each observed activation is taken right after its node, so later in-place ops cannot change it.
Per unit we accumulate, in float64 on the models' device, the sample count and sums of a, b, a^2,
b^2 and the cross sum a^T b; then ``corr = cov / (std_a std_b + eps)`` (REPAIR, eps = 1e-4 as in
the paper; dead channels give 0, not NaN).

Precision: each batch's products are formed in the activations' dtype (a float32 GEMM is about
twice as fast as a float64 one on CPU) and added to float64 accumulators. Values are first
shifted by a per-channel constant (the first batch's mean), so the sums are of centred-ish values
and ``cov = E[ab] - E[a]E[b]`` does not cancel catastrophically.

Speed: the copy keeps the activation's own layout, viewed as ``[before, channels, after]``
(``N x C x HW`` for a conv): moving channels last is a transposing copy that cost twice the cross
product itself on early conv layers. The cross sum is then one GEMM when nothing follows the
channels (tokens, linear layers), a batched GEMM over ``before`` when many positions follow them
(early conv layers), and a GEMM on a channels-last copy otherwise (late, wide conv layers), the
faster of the two there (benchmarks in docs/benchmarks.md).
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn as nn

from .points import Plan, Point, Unit

__all__ = ["capture_module", "CorrelationStats"]


_BMM_ELEMENTS = 2**24  # bound on a batched cross product's [chunk, C, C] intermediate


def _capture(x: torch.Tensor, axis: int) -> torch.Tensor:
    """A fresh floating-point copy of ``x`` viewed as ``[before, channels, after]``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"observed node returned {type(x).__name__}, not a tensor")
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    out.copy_(x.detach())
    return out.reshape(math.prod(x.shape[:axis]), x.shape[axis], -1)


def _cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[C, C]`` sums of ``a[., i, .] * b[., j, .]`` for ``[before, C, after]`` inputs."""
    before, c, after = a.shape
    if after == 1:
        return a.view(before, c).T @ b.view(before, c)
    if after >= c:
        chunk = max(1, _BMM_ELEMENTS // (c * c))
        out = torch.bmm(a[:chunk], b[:chunk].transpose(1, 2)).sum(0)
        for i in range(chunk, before, chunk):
            out += torch.bmm(a[i : i + chunk], b[i : i + chunk].transpose(1, 2)).sum(0)
        return out
    return a.transpose(1, 2).reshape(-1, c).T @ b.transpose(1, 2).reshape(-1, c)


def capture_module(model: nn.Module, fx_graph: fx.Graph, plan: Plan) -> fx.GraphModule:
    """``model`` run through the traced graph, returning the observed activations of ``plan``.

    The module shares ``model``'s submodules and parameters (nothing is copied).
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    captured: dict[tuple[str, int], fx.Node] = {}
    axes = {(p.node, p.axis) for p in plan.points}
    for node in fx_graph.nodes:
        if node.op == "output":
            continue
        env[node] = graph.node_copy(node, env.__getitem__)
        for name, axis in sorted(k for k in axes if k[0] == node.name):
            captured[(name, axis)] = graph.call_function(_capture, (env[node], axis))
    graph.output(tuple(captured[(p.node, p.axis)] for p in plan.points))
    return fx.GraphModule(model, graph)


class CorrelationStats:
    """Streaming float64 sums for every unit of a plan; :meth:`scores` gives correlations."""

    def __init__(self, plan: Plan, device: torch.device):
        self.plan = plan
        self.count = [[0] * len(p.units) for p in plan.points]
        self.sums: list[list[list[torch.Tensor]]] = []
        for p in plan.points:
            per_unit = []
            for u in p.units:
                n = u.size
                vecs = [torch.zeros(n, dtype=torch.float64, device=device) for _ in range(4)]
                per_unit.append([*vecs, torch.zeros(n, n, dtype=torch.float64, device=device)])
            self.sums.append(per_unit)
        self.index = [[_gather_index(u, p, device) for u in p.units] for p in plan.points]
        self.shift: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, acts_a: tuple[torch.Tensor, ...], acts_b: tuple[torch.Tensor, ...]) -> None:
        """Add one batch: ``acts_*[i]`` is point ``i``'s ``[before, channels, after]`` copy."""
        for i, (xa, xb) in enumerate(zip(acts_a, acts_b)):
            for j, idx in enumerate(self.index[i]):
                # the captured copies are ours: shifting them in place is safe. A unit's
                # replicas ([before, k, n, after] after indexing) count as samples.
                a = xa if idx is None else xa[:, idx].reshape(-1, idx.shape[-1], xa.shape[-1])
                b = xb if idx is None else xb[:, idx].reshape(-1, idx.shape[-1], xb.shape[-1])
                if (i, j) not in self.shift:
                    self.shift[(i, j)] = (a.mean((0, 2))[:, None], b.mean((0, 2))[:, None])
                ca, cb = self.shift[(i, j)]
                a.sub_(ca)
                b.sub_(cb)
                sa, sb, saa, sbb, sab = self.sums[i][j]
                sa += a.sum((0, 2))
                sb += b.sum((0, 2))
                saa += a.square().sum((0, 2))
                sbb += b.square().sum((0, 2))
                sab += _cross(a, b)
                self.count[i][j] += a.shape[0] * a.shape[2]

    def check_finite(self) -> None:
        """Raise ``FloatingPointError`` naming the first point whose activations were not finite."""
        for i, p in enumerate(self.plan.points):
            for j in range(len(p.units)):
                sa, sb, saa, sbb, _ = self.sums[i][j]
                for model, s, ss in (("model_a", sa, saa), ("model_b", sb, sbb)):
                    if not (torch.isfinite(s).all() and torch.isfinite(ss).all()):
                        raise FloatingPointError(
                            f"{model} produced NaN/inf activations at node '{p.node}' "
                            f"({p.target}); check the model's weights and inputs"
                        )

    def scores(self, eps: float = 1e-4) -> dict[tuple[str, ...], torch.Tensor]:
        """Correlation matrices ``[n_a, n_b]`` per unit key, summed over observation points."""
        out: dict[tuple[str, ...], torch.Tensor] = {}
        for i, p in enumerate(self.plan.points):
            for j, u in enumerate(p.units):
                n = self.count[i][j]
                sa, sb, saa, sbb, sab = self.sums[i][j]
                ma, mb = sa / n, sb / n
                corr = torch.div(sab, n).addr_(ma, mb, alpha=-1)  # cov, in place from here
                std_a = (saa / n - ma * ma).clamp_min(0).sqrt()
                std_b = (sbb / n - mb * mb).clamp_min(0).sqrt()
                corr.div_(torch.outer(std_a, std_b).add_(eps))
                if u.groups in out:
                    out[u.groups] += corr
                else:
                    out[u.groups] = corr
        return out


def _gather_index(unit: Unit, point: Point, device: torch.device) -> torch.Tensor | None:
    """Column index ``[k, n]`` into the point's channels, or None when it is all of them."""
    if unit.index.shape[0] == 1 and torch.equal(unit.index[0], torch.arange(point.size)):
        return None
    return unit.index.to(device)
