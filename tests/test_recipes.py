"""Recipes: each preset validates, an override changes only itself, YAML and flags stack in the
documented order, and a recipe's missing essentials are named."""

from __future__ import annotations

import pytest

from permask.cli import _parser, main
from permask.experiment.config import ConfigError, RunConfig, config_from_flags, load_config
from permask.experiment.recipes import NEEDS, RECIPES, recipe_values


def _config(*argv: str) -> RunConfig:
    return config_from_flags(_parser().parse_args(["run", *argv]))


def _needed(name: str) -> list[str]:
    return ["--dataset", "imagefolder:/data/imagenet"] if name in NEEDS else []


@pytest.mark.parametrize("name", list(RECIPES))
def test_each_recipe_validates_and_an_override_changes_only_itself(name):
    cfg = _config("--recipe", name, *_needed(name))
    values = recipe_values(name)
    assert all(getattr(cfg, k) == v for k, v in values.items())
    changed = _config("--recipe", name, *_needed(name), "--lr", "0.0123")
    assert changed.lr == 0.0123
    assert all(getattr(changed, k) == v for k, v in values.items() if k != "lr")


def test_the_paper_cifar_recipe_is_the_papers():
    cfg = _config("--recipe", "paper-cifar")
    assert (cfg.model, cfg.dataset, cfg.epochs, cfg.batch_size, cfg.lr) == (
        "resnet20", "cifar10", 200, 128, 0.08
    )  # fmt: skip
    assert (cfg.weight_decay, cfg.finetune_epochs, cfg.finetune_lr, cfg.imp_rate) == (
        5e-4, 50, 0.01, 0.2
    )  # fmt: skip
    assert (cfg.sparse_schedule, cfg.sparse_lr, cfg.schedule) == ("restart", 0.02, "cosine")


def test_yaml_and_flags_stack_on_a_recipe(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("recipe: paper-cifar\nepochs: 30\nwidth: 4\n")
    assert load_config(path).epochs == 30 and load_config(path).lr == 0.08
    cfg = _config("--config", str(path), "--epochs", "25")
    assert (cfg.epochs, cfg.width, cfg.lr, cfg.finetune_epochs) == (25, 4, 0.08, 50)
    # --recipe over the YAML's recipe, the YAML's own keys over both
    cfg = _config("--config", str(path), "--recipe", "demo")
    assert (cfg.epochs, cfg.width, cfg.lr) == (30, 4, 0.08)


def test_recipe_errors_name_the_fix(tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown recipe 'paper'; choose one of demo, paper-"):
        _config("--recipe", "paper")
    with pytest.raises(ConfigError, match="paper-imagenet recipe needs --dataset imagefolder"):
        _config("--recipe", "paper-imagenet")
    path = tmp_path / "cfg.yaml"
    path.write_text("recipe: paper-imagenet\n")
    with pytest.raises(ConfigError, match="paper-imagenet recipe needs --dataset"):
        load_config(path)
    assert main(["run", "--recipe", "nope"]) == 2
    assert "unknown recipe 'nope'" in capsys.readouterr().err


def test_every_shipped_config_loads_and_validates(capsys):
    from permask.experiment.recipes import shipped_configs

    shipped = shipped_configs()
    assert len(shipped) >= 10 and "paper/resnet20x4_cifar10" in shipped
    for name, (_, what) in shipped.items():
        extra = ["--dataset", "imagefolder:/data/imagenet"] if "imagenet" in name else []
        cfg = _config("--config", name, *extra)
        assert cfg.epochs in (90, 200) and what  # a paper recipe, described
        assert all(0 <= k < cfg.epochs for k in cfg.rewind)
    grid = _config("--config", "paper/resnet20x4_cifar10")
    assert (grid.width, grid.sparsity, grid.rewind) == (4, [0.8, 0.9, 0.95, 0.97], [0, 20, 50, 75])
    assert _config("--config", "paper/early_matching_resnet20_cifar10").match_epoch == 5
    with pytest.raises(ConfigError, match="no config file 'paper/nope'.*--list-configs"):
        _config("--config", "paper/nope")
    assert main(["run", "--list-configs"]) == 0
    assert "paper/vgg11_cifar100" in capsys.readouterr().out
