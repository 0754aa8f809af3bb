"""Which groups admit an orthogonal map, not just a permutation, and what must be folded first.

A permutation matrix is one orthogonal map; a group whose values only ever meet linear layers,
residual additions, per-position scalings and squared norms (the residual stream of a pre-norm
transformer) keeps the model's function under *any* orthogonal ``O``: every member axis moves as
``v -> O v``, exactly as permutations move them. This module decides that per group, from the
traced fx graph, and says why where it cannot:

* every activation carrying the group must carry it as a whole axis (no view merges or splits
  it) and come from an op that is linear in the group's values: linear layers and ungrouped
  convs, additions of streams or of members (biases, position embeddings; never a constant),
  products with values constant along the axis (RMSNorm's ``x * rsqrt(...)``, a scalar), views,
  casts, dropout, concatenation;
* a value, or a member tensor, leaves the group only through a contraction (a linear layer's
  input) or as the sum of its squares (RMSNorm's and LayerNorm's statistics are invariant);
* an elementwise gain on the group (RMSNorm's or LayerNorm's weight, with LayerNorm's bias) does
  not commute with ``O``: it is *folded* into the linear layers it feeds (``W diag(g)``, and
  ``W b`` into their biases, or the norm keeps ``b / g`` and turns it where a layer has no
  bias; :func:`permask.rotate.fold_norms`), which needs the gain read by that one norm and every
  path from it to end in a linear layer whose weight is used nowhere else (not tied:
  :func:`permask.rotate.untie_weights` unties);
* LayerNorm also subtracts the mean, so there ``O`` must keep the all-ones direction
  (``keeps_ones``).

Anything else (an elementwise nonlinearity, a gain that reaches a residual addition as in
post-norm BERT, a tied output layer) refuses the group with that op named: soundness first.

>>> import torch, torch.nn as nn, permask
>>> class Block(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.inp, self.norm = nn.Linear(3, 4), nn.RMSNorm(4)
...         self.fc, self.out = nn.Linear(4, 4), nn.Linear(4, 2)
...     def forward(self, x):
...         h = self.inp(x)
...         h = h + self.fc(self.norm(h))
...         return self.out(h)
>>> graph = permask.trace(Block(), torch.randn(2, 3))
>>> ok = permask.orthogonal_groups(graph)["inp.weight:0"]
>>> ok.admitted, [f.gain for f in ok.folds], ok.keeps_ones
(True, ['norm.weight'], False)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .graph import Group, PermutationGraph
from .layout import GroupAxis
from .registry import find_role
from .rules._util import arg

__all__ = [
    "Fold", "Admission", "orthogonal_groups", "admitted", "ones_complement", "keeping_ones",
    "turn_axis", "work_dtype", "kind_of",
    "tensor_uses",
]  # fmt: skip


@dataclass(frozen=True)
class Fold:
    """Gain ``gain`` (and LayerNorm bias ``bias``) folded into the linear layers ``into``:
    (weight, its input axis, its bias or None) for each layer the gain's output feeds.
    ``kept``: one of those layers has no bias (GPT-2's output layer), so the norm keeps its
    bias, divided by the gain (``g * (x + b / g)``), and it turns with the group."""

    gain: str
    bias: str | None
    into: tuple[tuple[str, int, str | None], ...]
    kept: bool = False


@dataclass(frozen=True)
class Admission:
    """Whether group ``group`` admits orthogonal maps; if not, ``reason`` says which op stops
    it. ``folds``: gains to fold first; ``keeps_ones``: ``O`` must map the all-ones vector to
    itself (a LayerNorm centres the group)."""

    group: str
    admitted: bool
    reason: str | None = None
    folds: tuple[Fold, ...] = ()
    keeps_ones: bool = False

    @property
    def folded(self) -> set[str]:
        """The gains and norm biases, which stay as they are (ones, zeros) once folded; a
        ``kept`` bias is not among them: it turns with the group."""
        return {f.gain for f in self.folds} | {f.bias for f in self.folds if f.bias and not f.kept}


def orthogonal_groups(graph: PermutationGraph) -> dict[str, Admission]:
    """An :class:`Admission` for every group of ``graph`` (see the module doc)."""
    uses = tensor_uses(graph)
    return {g.name: _Check(graph, g, uses).run() for g in graph}


def admitted(graph: PermutationGraph, groups=None) -> dict[str, Admission]:
    """The admitted groups of ``graph`` (all, or those named in ``groups``; naming a refused
    group raises with the reason it was refused)."""
    found = orthogonal_groups(graph)
    if groups is None:
        return {k: a for k, a in found.items() if a.admitted}
    out = {}
    for name in groups:
        if name not in found:
            raise ValueError(f"the graph has no group {name!r}; pass names from graph.groups")
        if not found[name].admitted:
            raise ValueError(f"group {name!r} admits no orthogonal map: {found[name].reason}")
        out[name] = found[name]
    return out


def ones_complement(n: int) -> torch.Tensor:
    """An orthonormal basis (n x n-1, float64) of the vectors orthogonal to all-ones."""
    ones = torch.ones(n, 1, dtype=torch.float64) / n**0.5
    q, _ = torch.linalg.qr(torch.cat([ones, torch.eye(n, dtype=torch.float64)[:, : n - 1]], 1))
    return q[:, 1:]


def keeping_ones(inner: torch.Tensor) -> torch.Tensor:
    """The ``n x n`` map (float64, on ``inner``'s device; ``n`` = ``inner``'s size + 1) that acts
    as ``inner`` on :func:`ones_complement`'s basis ``C`` and keeps the all-ones direction:
    ``C inner C^T + (I - C C^T)``; orthogonal when ``inner`` is."""
    n = inner.shape[0] + 1
    basis = ones_complement(n).to(inner.device)
    eye = torch.eye(n, dtype=torch.float64, device=inner.device)
    return basis @ inner @ basis.T + (eye - basis @ basis.T)


def work_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a map is applied to ``t`` in: float64 for float64 ``t``, else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def turn_axis(t: torch.Tensor, axis: int, o: torch.Tensor) -> torch.Tensor:
    """``t`` with each vector along ``axis`` mapped to ``o @ v`` (in :func:`work_dtype`), in
    ``t``'s dtype."""
    work = work_dtype(t)
    moved = t.to(work).movedim(axis, 0)
    flat = o.to(device=t.device, dtype=work) @ moved.reshape(moved.shape[0], -1)
    return flat.reshape(moved.shape).movedim(0, axis).to(t.dtype)


class _Refused(Exception):
    pass


_PASS = {
    "alias", "clone", "contiguous", "detach", "dropout", "identity", "to", "_to_copy", "view",
    "reshape", "_unsafe_view", "flatten", "unflatten", "unsqueeze", "squeeze", "permute",
    "transpose", "t", "expand", "expand_as", "getitem", "select", "slice", "split", "chunk",
    "unbind", "movedim", "type_as", "float", "type", "index", "index_select", "neg",
}  # fmt: skip
_JOIN = {"cat", "stack", "concat", "concatenate"}
_LINEAR = {
    "linear", "addmm", "mm", "matmul", "bmm", "baddbmm", "conv", "conv1d", "conv2d", "conv3d",
    "convolution", "embedding",
}  # fmt: skip
_BATCHED = {"mm", "matmul", "bmm", "baddbmm"}  # the group may be a batch dim of both operands
_CONVS = {"conv": None, "conv1d": 6, "conv2d": 6, "conv3d": 6, "convolution": 8}  # groups arg
_ADD = {"add", "sub", "iadd", "add_", "sub_"}
_SCALE = {"mul", "mul_", "div", "div_", "truediv"}
_SUMS = {"mean", "sum"}
_NORMS = {"layer_norm": True, "rms_norm": False}  # name -> keeps_ones
_NO_VALUE = {"_assert_tensor_metadata", "sym_size", "size", "dim", "_assert_scalar", "getattr"}
_MODULES = {"Linear": "linear", "Conv1d": "conv", "Conv2d": "conv", "Conv3d": "conv",
            "Embedding": "embedding", "LayerNorm": "layer_norm", "RMSNorm": "rms_norm"}  # fmt: skip


def kind_of(node: fx.Node) -> str:
    """The op's plain name: ``add`` for ``aten.add.Tensor``, ``operator.add`` or ``x.add``;
    a module's class mapped to its op (``linear``), or ``identity`` for pass-through modules."""
    t = node.target
    if node.op == "call_module":
        module = node.graph.owning_module.get_submodule(t)
        name = type(module).__name__
        if name in _MODULES:
            return _MODULES[name]
        return "identity" if find_role(node.op, t, module) == "pass_through" else name
    if node.op == "call_method":
        return t
    text = str(t) if not hasattr(t, "__name__") or "aten" in str(t) else t.__name__
    if text.startswith("aten."):
        return text.split(".")[1]
    return text.rsplit(".", 1)[-1]


def tensor_uses(graph: PermutationGraph) -> dict[str, int]:
    """How many ops read each tensor, by its first name (tied weights count once per reader)."""
    uses: dict[str, int] = {}
    gm = graph.fx_graph.owning_module
    canon: dict[int, str] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        canon.setdefault(id(p), name)
    for node in graph.fx_graph.nodes:
        if node.op == "get_attr":
            uses[node.target] = uses.get(node.target, 0) + len(node.users)
        elif node.op == "call_module":
            for pname, p in gm.get_submodule(node.target).named_parameters(recurse=False):
                name = canon.get(id(p), f"{node.target}.{pname}")
                uses[name] = uses.get(name, 0) + 1
    return uses


@dataclass
class _Check:
    graph: PermutationGraph
    group: Group
    uses: dict[str, int]
    folds: list[Fold] = field(default_factory=list)
    keeps_ones: bool = False

    def run(self) -> Admission:
        try:
            self.check()
        except _Refused as why:
            return Admission(self.group.name, False, str(why))
        return Admission(self.group.name, True, None, tuple(self.folds), self.keeps_ones)

    def check(self) -> None:
        g = self.group
        for m in g.members:
            if not isinstance(m.layout, GroupAxis):
                raise _Refused(f"tensor {m.tensor} holds the group inside a structured axis")
        self.carrying: set[str] = set()
        for o in g.observations:
            if o.op == "get_attr":
                continue
            if not isinstance(o.layout, GroupAxis):
                raise _Refused(f"node {o.node} merges or splits the group's axis with another")
            self.carrying.add(o.node)
        for node in self.graph.fx_graph.nodes:  # in graph order: folds listed as they run
            if node.op == "get_attr" and self.member(node.target):
                for user in node.users:  # a member read by an op that does not carry the group
                    if user.name not in self.carrying:
                        self.leaving(node, user)
            if node.name not in self.carrying:
                continue
            self.inside(node, kind_of(node))
            for user in node.users:
                if user.name not in self.carrying:
                    self.leaving(node, user)

    # ---- ops whose output carries the group
    def inside(self, node: fx.Node, kind: str) -> None:
        if kind in _LINEAR:
            return self.linear(node, kind)
        if kind in _PASS or kind in _SUMS:
            return
        if kind in _JOIN or kind in _ADD:
            values = list(node.args[0]) if kind in _JOIN else list(node.args[:2])
            for value in values:
                if not (isinstance(value, fx.Node) and self.carries(value)):
                    raise _Refused(f"{kind} at node {node.name} adds a value that is not in "
                                   "the group (constant along its axis)")  # fmt: skip
            return
        if kind in _SCALE:
            return self.scale(node, kind)
        if kind == "pow" and node.args[1:2] == (2,):
            for user in node.users:
                if kind_of(user) in _NO_VALUE:
                    continue
                if user.name in self.carrying or kind_of(user) not in _SUMS:
                    raise _Refused(f"node {node.name} squares the group's values elementwise")
            return
        if kind in _NORMS:
            return self.norm(node, kind)
        raise _Refused(f"{kind} at node {node.name} is not linear in the group's values")

    def scale(self, node: fx.Node, kind: str) -> None:
        args = _node_args(node)
        ours = [a for a in args if self.carries(a)]
        gains = [a for a in ours if a.op == "get_attr"]
        dividend = kind.startswith("mul") or (node.args[0] is ours[0] if ours else False)
        if len(ours) == 1 and not gains and dividend and "rounding_mode" not in node.kwargs:
            return  # a factor constant along the group's axis
        if len(ours) == 2 and len(gains) == 1 and kind.startswith("mul"):
            if len(self.graph.shapes.get(gains[0].target, ())) == 1:
                return self.fold(node, gains[0].target, None)
        raise _Refused(f"{kind} at node {node.name} multiplies the group's values elementwise")

    def norm(self, node: fx.Node, kind: str) -> None:
        if node.op == "call_module":
            m = node.graph.owning_module.get_submodule(node.target)
            weight = f"{node.target}.weight" if getattr(m, "weight", None) is not None else None
            bias = f"{node.target}.bias" if getattr(m, "bias", None) is not None else None
            shape = m.normalized_shape
        else:
            shape = arg(node.args, node.kwargs, 1, "normalized_shape")
            weight = _attr(arg(node.args, node.kwargs, 2, "weight"))
            bias = _attr(arg(node.args, node.kwargs, 3, "bias")) if kind == "layer_norm" else None
        if len(shape) != 1 or weight is None or not self.member(weight):
            raise _Refused(f"{kind} at node {node.name} normalises more than the group's axis")
        self.keeps_ones |= _NORMS[kind]
        self.fold(node, weight, bias)

    def fold(self, node: fx.Node, gain: str, bias: str | None) -> None:
        """Record the fold of ``gain`` (and ``bias``) applied at ``node`` into the linear
        layers its output reaches, refusing any other op on the way."""
        for t in (gain, bias):
            if t is not None and self.uses.get(t, 0) != 1:
                raise _Refused(f"{t} is read by more than one op: one fold would change the "
                               "others")  # fmt: skip
        into: list[tuple[str, int, str | None]] = []
        todo, seen = list(node.users), set()
        while todo:
            user = todo.pop()
            if user.name in seen:
                continue
            seen.add(user.name)
            kind = kind_of(user)
            if kind in _NO_VALUE:
                continue
            if user.name in self.carrying and kind in _PASS:
                todo.extend(user.users)
                continue
            if kind not in {"linear", "addmm"}:
                raise _Refused(f"the gain {gain} reaches {kind} at node {user.name}; it can "
                               "only be folded into linear layers")  # fmt: skip
            into.append(self.consumer(user, gain))
        kept = bias is not None and any(c is None for _, _, c in into)
        if kept and not self.member(bias):
            raise _Refused(f"the bias {bias} stays in its norm and must turn with the group, "
                           "but the group does not hold it")  # fmt: skip
        self.folds.append(Fold(gain, bias, tuple(into), kept))

    def consumer(self, user: fx.Node, gain: str) -> tuple[str, int, str | None]:
        if user.op == "call_module":
            m = user.graph.owning_module.get_submodule(user.target)
            w = _canonical(user, "weight")
            b = _canonical(user, "bias") if getattr(m, "bias", None) is not None else None
        else:
            params = [a.target for a in _node_args(user) if a.op == "get_attr"]
            w = next((p for p in params if self.member(p) or self.uses.get(p, 0) > 1), None)
            b = next((p for p in params if p != w), None)
        if self.uses.get(w, 0) > 1:
            raise _Refused(f"the gain {gain} cannot be folded into {w}: that weight is also "
                           "used elsewhere (tied); untie it: permask.untie_weights")  # fmt: skip
        if w is None or len(self.graph.shapes.get(w, ())) != 2:
            raise _Refused(f"the gain {gain} feeds node {user.name}, which has no 2-D weight")
        return w, 0 if kind_of(user) == "addmm" else 1, b  # addmm: x @ w (HF Conv1D)

    def linear(self, node: fx.Node, kind: str, leaving: bool = False) -> None:
        """A grouped (depthwise) conv acts per channel, and a batched product of two tensors
        that both carry the group multiplies them elementwise along it: neither commutes."""
        if kind in _CONVS and _conv_groups(node, _CONVS[kind]) != 1:
            raise _Refused(f"grouped {kind} at node {node.name} acts on each channel alone")
        if kind in _BATCHED and not leaving:
            if sum(self.carries(a) for a in _node_args(node)) > 1:
                raise _Refused(f"{kind} at node {node.name} multiplies the group's values "
                               "elementwise (a batch dim of both operands)")  # fmt: skip

    # ---- ops that read the group and do not carry it
    def leaving(self, node: fx.Node, user: fx.Node) -> None:
        kind = kind_of(user)
        if kind in _LINEAR:
            return self.linear(user, kind, leaving=True)
        if kind in _NO_VALUE:
            return
        if kind in _SUMS and kind_of(node) == "pow":
            return  # checked with the square
        raise _Refused(f"{kind} at node {user.name} reads the group's values along its axis")

    def carries(self, arg: fx.Node) -> bool:
        return arg.name in self.carrying or (arg.op == "get_attr" and self.member(arg.target))

    def member(self, tensor: str) -> bool:
        return any(m.tensor == tensor for m in self.group.members)


def _node_args(node: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []

    def visit(a) -> None:
        if isinstance(a, fx.Node):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            for x in a:
                visit(x)

    visit(node.args)
    visit(tuple(node.kwargs.values()))
    return out


def _canonical(node: fx.Node, attr: str) -> str:
    """The first name of module ``node``'s parameter ``attr`` (a tied one has several)."""
    module = node.graph.owning_module
    p = getattr(module.get_submodule(node.target), attr)
    return next(n for n, q in module.named_parameters(remove_duplicate=False) if q is p)


def _conv_groups(node: fx.Node, pos: int | None) -> int:
    if node.op == "call_module":
        return node.graph.owning_module.get_submodule(node.target).groups
    return arg(node.args, node.kwargs, pos, "groups") or 1


def _attr(a) -> str | None:
    return a.target if isinstance(a, fx.Node) and a.op == "get_attr" else None
