import pytest
import torch
import torch.fx
from shared_data import one_thread, tiny_flags  # noqa: F401

from permask.models import build_model, mlp, resnet20, vgg11

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("model", "shape"),
    [
        (resnet20(), (2, 3, 32, 32)),
        (resnet20(width=2, num_classes=100), (2, 3, 32, 32)),
        (vgg11(), (2, 3, 32, 32)),
        (vgg11(batch_norm=True), (2, 3, 32, 32)),
        (mlp(), (2, 1, 28, 28)),
    ],
)
def test_builtins_forward_and_trace(model, shape):
    x = torch.randn(shape)
    model.eval()
    out = model(x)
    assert out.shape[0] == 2
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), out)


def test_resnet20_structure():
    m = resnet20(width=2)
    names = [n for n, _ in m.named_modules()]
    shortcuts = [n for n in names if n.endswith("shortcut.0")]
    assert shortcuts == ["layer2.0.shortcut.0", "layer3.0.shortcut.0"]
    assert m.get_submodule("layer2.0.shortcut.0").kernel_size == (3, 3)
    assert m.linear.in_features == 128
    assert sum(isinstance(x, torch.nn.Conv2d) for x in m.modules()) == 21


def test_vgg11_structure():
    m = vgg11(width=2)
    convs = [x for x in m.features if isinstance(x, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [128, 256, 512, 512, 1024, 1024, 1024, 1024]
    assert all(c.bias is not None for c in convs)
    assert m.classifier.in_features == 1024
    bn_convs = [x for x in vgg11(batch_norm=True).features if isinstance(x, torch.nn.Conv2d)]
    assert all(c.bias is None for c in bn_convs)


def test_deterministic_init():
    for name in ["resnet20", "vgg11", "mlp"]:
        torch.manual_seed(0)
        a = build_model(name)
        torch.manual_seed(0)
        b = build_model(name)
        for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(v, w), (name, k)


def test_build_model_names():
    assert build_model("mlp", in_channels=1, image_size=28).fc1.in_features == 784
    assert build_model("mlp", in_channels=3).fc1.in_features == 3072
    assert isinstance(build_model("resnet20", width=2, num_classes=100).linear, torch.nn.Linear)
    tv = build_model("tv:resnet18", num_classes=7)
    assert tv.fc.out_features == 7
    tm = build_model("timm:resnet10t", num_classes=5, in_channels=1)
    assert tm.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 5)
    with pytest.raises(ValueError, match="unknown model 'nope'.*resnet20.*timm:NAME"):
        build_model("nope")


def test_your_own_factory_runs_the_pipeline_and_a_typo_in_it_is_one_line(
    tmp_path, monkeypatch, mnist_dir, capsys
):
    """``permask run --model module.path:factory``: the same factory as the step-wise commands."""
    from permask.cli import main

    (tmp_path / "mynets.py").write_text(
        "import torch.nn as nn\n"
        "def small():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    flags = tiny_flags(mnist_dir, seeds=1, train_subset=200, test_subset=100, interp_points=2)
    flags = [f for f in flags if f not in ("--model", "mlp")]
    assert main(["run", "--model", "mynets:small", *flags, "--out", str(tmp_path / "r")]) == 0
    assert "dense B: test acc" in (tmp_path / "r" / "run.log").read_text()
    assert build_model("mynets:small")[1].out_features == 32
    capsys.readouterr()
    for model, words in [("mynets:big", "mynets has no callable 'big'"),
                         ("nosuchmod:f", "cannot import 'nosuchmod'")]:  # fmt: skip
        assert main(["run", "--model", model, *flags, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("flags", "words"),
    [(["--model", "mlp", "--width", "4"], "width 4 applies to resnet20 and vgg11 only"),
     (["--model", "resnet20", "--batch-norm"], "batch_norm applies to vgg11 only")],
)  # fmt: skip
def test_a_setting_the_model_has_no_knob_for_is_an_error(tmp_path, capsys, flags, words):
    from permask.cli import main

    assert main(["run", *flags, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert words in err and not (tmp_path / "r").exists()
