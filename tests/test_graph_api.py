"""Public API of the graph: tracing side effects, errors, Permutation, printing, masks."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import warnings

import networkx as nx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from equivariance import assert_equivariant, double_eval, outputs, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

import permask
from permask.models import resnet20


def state_hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def resnet():
    model = double_eval(resnet20())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    return model, x, permask.trace(model, x)


def test_trace_leaves_model_untouched():
    model = resnet20().train()
    before = state_hash(model)
    modes = [m.training for m in model.modules()]
    permask.trace(model, torch.randn(2, 3, 32, 32))
    assert state_hash(model) == before
    assert [m.training for m in model.modules()] == modes


def test_trace_model_on_meta_device():
    """Tracing never needs the model's values, so a model on any device traces."""
    model = resnet20().to("meta")
    graph = permask.trace(model, torch.randn(2, 3, 32, 32, device="meta"))
    assert len(graph) == 12


def test_trace_falls_back_to_real_values_when_needed():
    class UsesItem(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.b(F.relu(self.a(x)) * x.abs().max().item())

    model = double_eval(UsesItem())
    x = torch.randn(3, 4, dtype=torch.float64)
    graph = permask.trace(model, x)
    assert [g.size for g in graph] == [6]
    assert_equivariant(model, x, graph, seed=0)


def test_forward_arguments_not_given_are_traced_at_their_defaults():
    """``if mask is not None`` must take the branch the call takes (timm's Hiera failed here)."""

    class OptionalMask(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x, mask=None, scale: float = 2.0):
            h = F.relu(self.a(x))
            if mask is not None:
                h = h * mask.view(-1, 1)
            return self.b(h) * scale

    model = double_eval(OptionalMask())
    x = torch.randn(3, 4, dtype=torch.float64)
    graph = permask.trace(model, x)
    assert [g.size for g in graph] == [6]
    assert_equivariant(model, x, graph, seed=0)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.lin(x)
        return -self.lin(x)


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.block = DataDependent()
        self.post = nn.Linear(4, 2)

    def forward(self, x):
        return self.post(F.relu(self.block(F.relu(self.pre(x)))))


def test_untraceable_model_names_module_and_fix():
    with pytest.raises(permask.TraceError) as err:
        permask.trace(Wrapper(), torch.randn(2, 4))
    msg = str(err.value)
    assert "'block'" in msg and "DataDependent" in msg and "register_rule" in msg


def _data_dependent_rule(ctx: permask.graph.RuleContext, x: permask.graph.TracedTensor) -> list:
    w, b = ctx.tensor("weight", ctx.module.lin), ctx.tensor("bias", ctx.module.lin)
    ctx.unify(w.axes[1], x.axes[-1])
    ctx.unify(b.axes[0], w.axes[0])
    return [*x.axes[:-1], w.axes[0]]


def _decline(ctx, x):
    raise permask.graph.Decline("declined for a test")


def test_a_rule_given_to_trace_makes_a_leaf_and_is_used_for_that_call_only():
    model = double_eval(Wrapper())
    x = torch.randn(5, 4, dtype=torch.float64)
    graph = permask.trace(model, x, rules={DataDependent: _data_dependent_rule})
    assert sorted(graph.groups) == ["block.lin.weight:0", "pre.weight:0"]
    assert_equivariant(model, x, graph, seed=3)
    with pytest.raises(permask.TraceError, match="DataDependent"):  # not registered
        permask.trace(model, x)


def test_register_rule_makes_a_leaf_and_is_used():
    from permask.graph import registry

    permask.register_rule(DataDependent)(_data_dependent_rule)
    try:
        model = double_eval(Wrapper())
        x = torch.randn(5, 4, dtype=torch.float64)
        graph = permask.trace(model, x)
        assert sorted(graph.groups) == ["block.lin.weight:0", "pre.weight:0"]
        assert_equivariant(model, x, graph, seed=3)
        with pytest.raises(ValueError, match="already registered"):
            permask.register_rule(DataDependent)(lambda ctx, x: x.axes)
        # a rule given to one call comes first: this one declines, freezing all it touches
        declined = permask.trace(model, x, rules={DataDependent: _decline})
        assert list(declined.groups) == []
        assert "declined for a test" in str(declined)
    finally:
        registry._MODULE_RULES.pop(DataDependent)  # the one test of the global registry


def test_subclass_with_new_forward_does_not_inherit_rule():
    class WeirdConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x.flip(1))  # channel order matters now

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 1), WeirdConv(4, 4, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.c(self.b(self.a(x)))

    model = double_eval(Net())
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    graph = permask.trace(model, x)  # traced through: flip has no rule and freezes
    assert "a.weight:0" not in graph.groups
    assert_equivariant(model, x, graph, seed=0)


@settings(max_examples=10, deadline=None)
@given(s1=st.integers(0, 2**31 - 1), s2=st.integers(0, 2**31 - 1))
def test_permutation_algebra(resnet, s1, s2):
    model, x, graph = resnet
    p = permask.random_permutation(graph, torch.Generator().manual_seed(s1))
    q = permask.random_permutation(graph, torch.Generator().manual_seed(s2))
    assert p.compose(p.inverse()).is_identity()
    twice = permask.permute_model(permask.permute_model(model, p, graph), q, graph)
    once = permask.permute_model(model, p @ q, graph)
    for (k, a), b in zip(twice.state_dict().items(), once.state_dict().values()):
        assert torch.equal(a, b), k
    back = permask.permute_model(permask.permute_model(model, p, graph), p.inverse(), graph)
    for a, b in zip(model.state_dict().values(), back.state_dict().values()):
        assert torch.equal(a, b)


def test_permutation_save_load_and_validation(resnet, tmp_path):
    _, _, graph = resnet
    p = permask.random_permutation(graph, torch.Generator().manual_seed(0))
    p.save(tmp_path / "pi.safetensors")
    assert permask.Permutation.load(tmp_path / "pi.safetensors") == p
    assert permask.Permutation.identity(graph).is_identity()
    with pytest.raises(ValueError, match="not a permutation"):
        permask.Permutation({"g": torch.tensor([0, 0, 1])})


def test_permute_errors_name_the_problem(resnet):
    model, _, graph = resnet
    with pytest.raises(ValueError, match="does not know"):
        permask.permute_model(model, permask.Permutation({"nope": torch.arange(3)}), graph)
    name = next(iter(graph.groups))
    with pytest.raises(ValueError, match="has size"):
        permask.permute_model(model, permask.Permutation({name: torch.arange(3)}), graph)
    with pytest.raises(ValueError, match="shape"):
        permask.permute_tensors(
            {"conv1.weight": torch.zeros(3, 3)}, permask.random_permutation(graph), graph
        )


def test_inplace_keeps_parameter_objects(resnet):
    model, x, graph = resnet
    m = double_eval(resnet20())
    params = [id(p) for p in m.parameters()]
    y = outputs(m, x)
    out = permask.permute_model(m, permask.random_permutation(graph), graph, inplace=True)
    assert out is m and [id(p) for p in m.parameters()] == params
    assert rel_err(y, outputs(m, x)) < 1e-10


def test_permute_mask_keeps_sparsity_and_masked_function(resnet):
    model, x, graph = resnet
    gen = torch.Generator().manual_seed(0)
    mask = {
        n: torch.rand(p.shape, generator=gen) > 0.7
        for n, p in model.named_parameters()
        if p.ndim > 1
    }
    pi = permask.random_permutation(graph, gen)
    pmask = permask.permute_mask(mask, pi, graph)
    for n in mask:
        assert pmask[n].dtype == torch.bool and pmask[n].sum() == mask[n].sum()
    masked = double_eval(resnet20())
    masked.load_state_dict(model.state_dict())
    with torch.no_grad():
        for n, p in masked.named_parameters():
            if n in mask:
                p.mul_(mask[n])
    permuted = permask.permute_model(masked, pi, graph)
    with torch.no_grad():
        for n, p in permuted.named_parameters():
            if n in pmask:
                assert torch.all(p[~pmask[n]] == 0), n
    assert rel_err(outputs(masked, x), outputs(permuted, x)) < 1e-10


def test_permute_mask_refuses_names_and_shapes_of_another_model(resnet):
    """A mask entry the traced model does not have would pass through unpermuted."""
    _, _, graph = resnet
    pi = permask.random_permutation(graph)
    with pytest.raises(KeyError, match="'conv.weight' names no parameter"):
        permask.permute_mask({"conv.weight": torch.ones(16, 3, 3, 3, dtype=torch.bool)}, pi, graph)
    with pytest.raises(KeyError, match="'bn1.running_mean' names no parameter"):  # a buffer
        permask.permute_mask({"bn1.running_mean": torch.ones(16, dtype=torch.bool)}, pi, graph)
    with pytest.raises(ValueError, match=r"'conv1.weight' has shape \(8, 3, 3, 3\)"):
        permask.permute_mask({"conv1.weight": torch.ones(8, 3, 3, 3, dtype=torch.bool)}, pi, graph)


def test_example_inputs_that_do_not_fit_name_the_node():
    """One message naming the node and the fix, without torch.fx's appended traceback."""
    from permask.models import mlp

    with pytest.raises(permask.TraceError) as err:  # a ValueError, as before
        permask.trace(mlp(12, (8,)), torch.randn(2, 13))
    assert isinstance(err.value, ValueError) and isinstance(err.value, RuntimeError)
    text = str(err.value)
    assert text.startswith("running node 'fc1' (call_module fc1) on the example inputs failed")
    assert text.endswith("Check that example_inputs fit the model.")
    assert "While executing" not in text


def test_print_and_networkx(resnet):
    _, _, graph = resnet
    text = str(graph)
    assert "12 groups" in text and "conv1.weight:0" in text and "frozen" in text
    g = graph.to_networkx()
    groups = [n for n, d in g.nodes(data=True) if d["kind"] == "group"]
    assert len(groups) == len(graph)
    assert g.number_of_edges() == sum(len(grp.members) for grp in graph)
    # a conv weight links its input and output groups: the stages form one component
    assert nx.has_path(g, ("group", "conv1.weight:0"), ("tensor", "linear.weight"))


class _ScaleShift(nn.Module):
    """docs/graph.md's example module (its forward branches on data: fx cannot trace it)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(n)), nn.Parameter(torch.zeros(n))

    def forward(self, x):
        if x.sum() > 0:
            return x * self.weight + self.bias
        return x * self.weight + self.bias


def test_the_rule_check_of_docs_graph_md():
    from permask.graph import RuleContext, TracedTensor
    from permask.testing import equivalence_error, perturb_

    def _scale_shift(ctx: RuleContext, x: TracedTensor) -> list:
        for name in ("weight", "bias"):
            ctx.unify(ctx.tensor(name).axes[0], x.axes[-1])
        return x.axes

    net = nn.Sequential(nn.Linear(16, 8), _ScaleShift(8), nn.ReLU(), nn.Linear(8, 4))
    model = perturb_(net.double().eval())
    x = torch.randn(4, 16, dtype=torch.float64)
    graph = permask.trace(model, x, rules={_ScaleShift: _scale_shift})
    for seed in range(5):
        pi = permask.random_permutation(graph, generator=torch.Generator().manual_seed(seed))
        assert equivalence_error(model, x, pi, graph) < 1e-10
    members = {(m.tensor, m.axis) for m in graph["0.weight:0"].members}
    assert {("1.weight", 0), ("1.bias", 0), ("3.weight", 1)} <= members
    with pytest.raises(permask.TraceError, match="_ScaleShift"):  # the rule was for that call
        permask.trace(model, x)


def test_observations_carry_the_role_their_rule_registered():
    """Activation matching picks points by role (nonlinear, residual, pass-through), which the
    rules' registrations state; no op is recognised by its class name."""
    from permask.graph.registry import register_role
    from permask.match.points import select_observations

    class Act(nn.Module):  # named like nothing permask knows
        def forward(self, x):
            return torch.relu(x)

    model = nn.Sequential(nn.Linear(4, 6), Act(), nn.Dropout(), nn.Linear(6, 2))
    rule = {Act: lambda ctx, x: x.axes}
    graph = permask.trace(model, torch.randn(3, 4), rules=rule)
    roles = {o.node: o.role for o in graph["0.weight:0"].observations}
    assert roles == {"_0": None, "_1": None, "_2": "pass_through"}
    with pytest.raises(ValueError, match="unknown role 'hidden'"):
        register_role("hidden", Act)
    register_role("nonlinear", Act)
    try:
        graph = permask.trace(model, torch.randn(3, 4), rules=rule)
        assert {o.node: o.role for o in graph["0.weight:0"].observations}["_1"] == "nonlinear"
        assert [o.node for o in select_observations(graph["0.weight:0"].observations)] == ["_1"]
    finally:
        from permask.graph import registry

        registry._ROLES.pop(Act)


def test_every_tracing_failure_is_a_trace_error():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(permask.TraceError, match=r"has 2 inputs but the model's forward takes 1"):
        permask.trace(model, (torch.randn(2, 4), torch.randn(2, 4)))
    with pytest.raises(permask.TraceError, match="must be Tensor, not str"):
        permask.trace(model, "hello")
    with pytest.raises(permask.TraceError, match="needs an nn.Module, got a str"):
        permask.trace("model", torch.randn(2, 4))


class _CumsumBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Identity())

    def forward(self, x):
        return torch.cumsum(self.conv1(x), dim=1)


def test_an_op_without_a_rule_is_named_with_its_module_in_a_warning_and_the_printout():
    net = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU(), _CumsumBlock(), nn.Conv2d(8, 4, 1))
    with pytest.warns(UserWarning, match=r"1 op\(s\) without a working rule.*torch\.cumsum in "):
        graph = permask.trace(net, torch.randn(1, 3, 8, 8))
    (op,) = graph.unruled_ops
    assert (op.op, op.module, op.node) == ("torch.cumsum", "2", "cumsum")
    assert "torch.cumsum in module '2' (node cumsum)" in str(graph)
    assert sorted(graph.groups) == ["0.weight:0"]  # the block's 8 channels are frozen
    frozen = str(graph).split("frozen: ")[1].split(" axes")[0]
    assert int(frozen) == len(graph.frozen)  # the header adds up
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model whose ops all have rules: no warning
        permask.trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), torch.randn(2, 4))


def test_trace_errors_show_values_not_fx_proxies():
    import timm

    with pytest.raises(permask.TraceError, match=r"Input height \(64\) doesn't match model"):
        permask.trace(timm.create_model("vit_tiny_patch16_224"), torch.randn(1, 3, 64, 64))


def test_the_printout_marks_cuts_keeps_counts_and_names_the_unpermuted():
    class Long(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            name = "a_rather_long_module_name_that_will_not_fit_in_a_column"
            self.add_module(name, nn.Linear(4, 6))
            self.head = nn.Linear(6, 2)
            self.name = name

        def forward(self, x):
            return self.head(torch.relu(getattr(self, self.name)(x)))

    text = str(permask.trace(Long(), torch.randn(2, 4)))
    row = next(line for line in text.splitlines() if line.startswith("a_rather"))
    assert "~" in row and "(+2)" in row  # cut with a marker, the count kept
    assert "traced tensors permuted (not: head.bias)" in text
    assert "(observed at: the fx node and output axis" in text


def test_a_deep_model_prints_one_row_per_repeated_block():
    """Groups alike but for their block index collapse into one row, with their count."""
    blocks = [nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)) for _ in range(30)]

    class Deep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(blocks)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            for b in self.blocks:
                x = x + b(x)
            return self.head(x)

    graph = permask.trace(Deep(), torch.randn(2, 8))
    assert len(graph) == 30  # the residual stream is the input's: fixed
    text = str(graph)
    assert "30 x blocks.{0..29}.0.weight:0" in text and "graph.groups lists each" in text
    assert len(text.splitlines()) < 15
    small = str(permask.trace(Deep().blocks[0], torch.randn(2, 8)))
    assert " x " not in small.splitlines()[2]  # few groups: one row each, as before


def test_tracing_a_model_without_timm_layers_does_not_import_timm():
    """timm (2.7 s, with torchvision and torch._dynamo) is imported for its rules only once the
    model's own code has imported it."""
    code = (
        "import sys, torch, permask; permask.trace(torch.nn.Linear(3, 2), torch.randn(1, 3)); "
        "print('timm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"]
