"""The ``permask`` command line: flags and YAML agree; config errors are one line, no work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from shared_data import tiny_flags

from permask.cli import _parser, main
from permask.experiment.config import ConfigError, RunConfig, config_from_flags, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_flags_and_yaml_give_the_same_config(tmp_path):
    yaml_file = tmp_path / "cfg.yaml"
    yaml_file.write_text(
        "model: resnet20\nwidth: 2\ndataset: cifar10\ndata-dir: /data\nsparsity: [0.97, 0.9]\n"
        "rewind: [0, 5]\nepochs: 20\nseeds: 3\nmatch: weight\nimp: rewind\nlr: 0.08\n"
        "channels_last: true\nmatch_epoch: 5\nout: runs/x\n"
    )
    flags = (
        "--model resnet20 --width 2 --dataset cifar10 --data-dir /data --sparsity 0.9 0.97 "
        "--rewind 0 5 --epochs 20 --seeds 3 --match weight --imp rewind --lr 0.08 "
        "--channels-last --match-epoch 5 --out runs/x"
    ).split()
    from_flags = config_from_flags(_parser().parse_args(["run", *flags]))
    from_yaml = config_from_flags(_parser().parse_args(["run", "--config", str(yaml_file)]))
    assert from_flags == from_yaml == load_config(yaml_file)
    assert from_flags.sparsity == [0.9, 0.97] and from_flags.rewind == [0, 5]
    assert from_flags.width == 2 and from_flags.channels_last is True


def test_help_states_each_default_once():
    """Every flag's help ends in at most one default, and never a bare "(default: None)"."""
    sub = next(a for a in _parser()._actions if a.dest == "command")
    text = sub.choices["run"].format_help()
    assert "(default: None)" not in text
    for action in sub.choices["run"]._actions:
        assert (action.help or "").count("(default") <= 1, action.dest


def test_flags_override_yaml(tmp_path):
    yaml_file = tmp_path / "cfg.yaml"
    yaml_file.write_text("epochs: 20\nseeds: 3\n")
    args = _parser().parse_args(["run", "--config", str(yaml_file), "--seeds", "5"])
    cfg = config_from_flags(args)
    assert (cfg.epochs, cfg.seeds) == (20, 5)


def test_demo_defaults_are_the_documented_demo():
    cfg = config_from_flags(_parser().parse_args(["demo"]), out="runs/demo")
    assert (cfg.model, cfg.dataset, cfg.epochs, cfg.seeds) == ("mlp", "fashion_mnist", 10, 1)
    assert (cfg.sparsity, cfg.rewind, cfg.imp, cfg.match) == ([0.98], [2], "finetune", "activation")
    assert cfg.run_dir == Path("runs/demo")


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--model", "nosuchnet"], "unknown model 'nosuchnet'"),
        (["--model", "timm:nosuchnet"], "unknown timm model 'nosuchnet'"),
        (["--model", "tv:resnet181"], "unknown torchvision model 'resnet181' (did you mean"),
        (["--sparsity", "0.9", "1.5"], "sparsity must be in (0, 1)"),
        (["--sparsity", "0"], "sparsity must be in (0, 1)"),
        (["--rewind", "12", "--epochs", "10"], "rewind points must be in [0, epochs)"),
        (["--dataset", "imagefolder:/no/such/dir"], "searched /no/such/dir/train"),
        (["--dataset", "svhn"], "unknown dataset 'svhn'"),
        (["--match", "magic"], "match must be one of activation, weight"),
        (["--lr", "-1"], "lr must be > 0, got -1.0"),
        (["--momentum", "1.5"], "momentum must be in [0, 1)"),
        (["--threads", "0"], "threads must be >= 1"),
        (["--amp", "fp32"], "amp must be one of off, bf16, fp16, got 'fp32'"),
        (["--sync-bn", "--device", "cpu"], "sync_bn needs GPUs"),
        (["--dist-timeout", "0"], "dist_timeout must be > 0 seconds"),
        (["--out", ""], "out is empty"),
    ],
)
def test_config_errors_are_one_line_before_any_work(tmp_path, capsys, mnist_dir, flags, words):
    out = tmp_path / "run"
    data = ["--data-dir", str(mnist_dir), "--dataset", "mnist"]
    assert main(["run", *data, "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("permask run: error: ") and words in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("model", ["nosuchnet", "timm:nosuchnet", "tv:nosuchnet"])
def test_a_model_typo_is_reported_before_any_data_is_touched(tmp_path, capsys, model):
    """The data dir does not exist, so reading data would try a download into it."""
    data_dir = tmp_path / "nodata" / "here"
    args = ["run", "--dataset", "mnist", "--data-dir", str(data_dir), "--model", model]
    assert main([*args, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "model 'nosuchnet'" in err and "dataset" not in err, err
    assert not (tmp_path / "nodata").exists() and not (tmp_path / "run").exists()


def test_unknown_yaml_key_is_an_error(tmp_path):
    yaml_file = tmp_path / "cfg.yaml"
    yaml_file.write_text("epoch: 3\n")
    with pytest.raises(ConfigError, match="unknown config key.*epoch"):
        load_config(yaml_file)


def test_cli_process_exits_nonzero_without_traceback(tmp_path):
    cmd = [sys.executable, "-m", "permask", "run", "--sparsity", "2", "--out", str(tmp_path / "x")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "permask run: error: sparsity must be in (0, 1), got [2.0]"
    ]


def test_config_rejects_a_run_dir_with_other_settings(tmp_path):
    (tmp_path / "config.yaml").write_text("epochs: 3\n")
    from permask.experiment.prepare import _check_run_dir

    with pytest.raises(ConfigError, match="holds a run with other settings"):
        _check_run_dir(RunConfig(out=str(tmp_path)))


def test_a_run_dir_that_cannot_be_created_is_one_line(tmp_path, capsys, mnist_dir):
    in_the_way = tmp_path / "afile"
    in_the_way.write_text("")
    data = ["--data-dir", str(mnist_dir), "--dataset", "mnist"]
    assert main(["run", *data, "--out", str(in_the_way)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"permask run: error: cannot create the run directory {in_the_way}")
    assert err.count("\n") == 1


def test_the_data_location_may_change_between_invocations(tmp_path):
    """Where the same dataset lives (--data-dir or $PERMASK_DATA) does not change results."""
    from permask.experiment.prepare import _check_run_dir

    key = {**RunConfig(data_dir="/old/place").to_dict()}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(key))
    _check_run_dir(RunConfig(out=str(tmp_path)))


def test_run_dir_from_before_a_setting_existed_counts_it_at_its_default(tmp_path):
    """A run saved before ``sparse_schedule`` existed resumes with the default, not another."""
    from permask.experiment.prepare import _check_run_dir

    key = RunConfig().results_key()
    del key["sparse_schedule"], key["sparse_lr"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(key))
    _check_run_dir(RunConfig(out=str(tmp_path)))
    with pytest.raises(ConfigError, match="sparse_schedule: 'continue' there, 'restart' now"):
        _check_run_dir(RunConfig(out=str(tmp_path), sparse_schedule="restart"))


def test_config_rejects_unknown_sparse_schedule_and_bad_sparse_lr():
    with pytest.raises(ConfigError, match="sparse_schedule must be one of continue, restart"):
        RunConfig(sparse_schedule="fresh")
    with pytest.raises(ConfigError, match="sparse_lr must be > 0"):
        RunConfig(sparse_schedule="restart", sparse_lr=0.0)
    with pytest.raises(ConfigError, match="sparse_lr applies only with sparse_schedule restart"):
        RunConfig(sparse_lr=0.02)


def test_prepare_rejects_a_bad_device_and_torchrun(tmp_path, monkeypatch):
    from permask.experiment.pipeline import prepare

    with pytest.raises(ConfigError, match="device must be auto or a torch device.*'gpu'"):
        prepare(RunConfig(device="gpu", out=str(tmp_path / "a")))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="has no CUDA"):
            prepare(RunConfig(device="cuda", out=str(tmp_path / "b")))
    with pytest.raises(ConfigError, match="'mps' has no float64.*--device cpu"):
        prepare(RunConfig(device="mps", out=str(tmp_path / "m")))
    monkeypatch.setenv("WORLD_SIZE", "2")  # but not started by torchrun
    with pytest.raises(ConfigError, match="RANK, LOCAL_RANK, .* not set; start several .*torchrun"):
        prepare(RunConfig(out=str(tmp_path / "c")))


def test_device_auto_is_the_gpu_when_there_is_one(tmp_path, mnist_dir):
    """The default device is ``auto``: the run uses CUDA where torch sees it, else the CPU; the
    caller's config is left as given."""
    from permask.experiment.pipeline import prepare

    cfg = RunConfig(dataset="mnist", data_dir=str(mnist_dir), train_subset=64, test_subset=64,
                    out=str(tmp_path / "auto"))  # fmt: skip
    assert cfg.device == "auto"
    exp = prepare(cfg)
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert exp.cfg.device == want and cfg.device == "auto"
    assert exp.train_loader.images.device.type == want
    assert next(exp.build(0).parameters()).device.type == want


def test_progress_bars_only_on_a_terminal(tmp_path, capsys, mnist_dir, monkeypatch):
    """A log file or pipe gets the plain lines per stage, no carriage-return bar updates."""
    from permask.experiment.train import bars_shown

    flags = tiny_flags(mnist_dir, seeds=1, train_subset=200, test_subset=100, interp_points=2)
    flags.remove("--no-progress")  # progress on (the default), stderr a pipe
    assert main(["run", *flags, "--out", str(tmp_path / "run")]) == 0
    out, err = capsys.readouterr()
    assert "\r" not in out + err and "dense A: test acc" in out + err
    assert not bars_shown(False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert bars_shown(True)


def test_one_reader_of_a_runs_config(tmp_path):
    """read_run_config: a newer version's key is ignored, a setting added since takes its
    default, and anything but a mapping is one line."""
    from permask.experiment.config import read_run_config

    assert read_run_config(tmp_path) is None
    (tmp_path / "config.yaml").write_text("model: mlp\nepochs: 3\nsetting_from_the_future: 1\n")
    cfg = read_run_config(tmp_path, out=str(tmp_path))
    assert (cfg.epochs, cfg.jobs, cfg.run_dir) == (3, RunConfig().jobs, tmp_path)
    (tmp_path / "config.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match="is not a config of permask run"):
        read_run_config(tmp_path)
