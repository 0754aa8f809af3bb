"""permask.check: one call that verifies a model's graph (and a new rule) by permuting it."""

import pytest
import torch
import torch.nn as nn

import permask
from permask.graph import Decline, RuleContext, TracedTensor


class CumsumBlock(nn.Module):
    """A block whose forward permask has no rule for: a cumulative sum over the channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        return torch.cumsum(self.conv(x), dim=1)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU(), CumsumBlock(), nn.Conv2d(8, 4, 1))


def wrong_cumsum(ctx: RuleContext, x: TracedTensor, dim: int, **kwargs) -> list:
    return x.axes  # claims cumsum is elementwise: permuting along `dim` changes its result


def right_cumsum(ctx: RuleContext, x: TracedTensor, dim: int, **kwargs) -> list:
    if not -x.ndim <= dim < x.ndim:
        raise Decline(f"dim {dim} out of range")
    d = dim % x.ndim
    ctx.freeze(x.axes[d], "cumsum runs along this axis")
    return [
        ctx.fixed(x.shape[i], "cumsum positions") if i == d else ax for i, ax in enumerate(x.axes)
    ]


def test_check_catches_the_wrong_rule_and_names_its_group():
    x = torch.randn(2, 3, 8, 8)
    result = permask.check(_net(), x, rules={torch.cumsum: wrong_cumsum})
    assert not result.ok and result.max_change > 1e-3
    assert list(result.culprits) == ["2.conv.weight:0"]  # the channels cumsum runs along
    assert "2.conv.weight:0" in str(result) and "groups responsible" in str(result)


def test_check_passes_the_right_rule_and_the_model_is_untouched():
    net, x = _net(), torch.randn(2, 3, 8, 8)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    result = permask.check(net, x, rules={torch.cumsum: right_cumsum})
    assert result.ok and result.max_change < 1e-12 and result.culprits == {}
    assert sorted(result.graph.groups) == ["0.weight:0"]  # cumsum's channels stay fixed
    assert str(result).startswith("ok: 1 groups")
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert next(net.parameters()).dtype == torch.float32


@pytest.mark.parametrize("builder", ["resnet20", "vgg11"])
def test_check_of_built_in_models_is_clean(builder):
    from permask.models import build_model

    result = permask.check(build_model(builder), torch.randn(2, 3, 32, 32), trials=2)
    assert result.ok and len(result.graph) > 5, result
