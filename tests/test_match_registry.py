"""Matchers by name (permask.match.matchers): the one list that align, merge, the config and the
command line check a method against, and the place to add one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import permask
from permask.cli import _parser
from permask.experiment import RunConfig
from permask.experiment.config import ConfigError
from permask.match.info import AlignInfo
from permask.match.matchers import _MATCHERS, Matcher, get_matcher, matcher_names, register_matcher


def test_every_entry_point_names_the_same_methods():
    assert matcher_names() == ("activation", "weight", "ste")
    with pytest.raises(
        ValueError, match="unknown method 'wieght'; choose 'activation' or 'weight' or 'ste'"
    ):
        get_matcher("wieght")
    with pytest.raises(ConfigError, match="match must be one of activation, weight, ste"):
        RunConfig(match="wieght")
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="unknown method 'wieght'"):
        permask.align(net, net, method="wieght", example_inputs=torch.randn(1, 4))
    with pytest.raises(ValueError, match="unknown method 'wieght'"):
        permask.merge([net, net], method="wieght")
    with pytest.raises(SystemExit):
        _parser().parse_args(["align", "mlp", "a.pt", "b.pt", "--method", "wieght"])


def test_a_registered_matcher_is_what_align_runs():
    def identity(req):
        pi = permask.Permutation({g.name: torch.arange(g.size) for g in req.graph})
        return pi, AlignInfo("identity", 0.0, len(req.graph))

    register_matcher(Matcher("identity", False, "every unit stays", identity))
    try:
        torch.manual_seed(0)
        a, b = (nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)) for _ in range(2))
        pi, info = permask.align(
            a, b, method="identity", example_inputs=torch.randn(1, 4), return_info=True
        )
        assert info.method == "identity" and all(
            torch.equal(p, torch.arange(8)) for p in pi.values()
        )
    finally:
        del _MATCHERS["identity"]
