"""The one model factory: :func:`build_model` builds the paper's CIFAR nets, any timm /
torchvision model by name, or a model of your own from ``module.path:factory``; every entry point
(``permask run``, the step-wise commands, :func:`permask.experiment.prepare.prepare`) uses it.

The built-ins are plain ``nn.Module`` trees with one ``nn.ReLU`` module per activation site (so
activation matching can observe every post-ReLU tensor) and no data-dependent control flow (they
trace with ``torch.fx``). Initialisation only uses torch's global RNG: the same
``torch.manual_seed`` gives the same weights.
"""

from __future__ import annotations

import difflib
import importlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch.nn as nn

__all__ = [
    "VGG",
    "BasicBlock",
    "ResNet20",
    "build_model",
    "check_model_name",
    "mlp",
    "model_names",
    "resnet20",
    "run_model_kwargs",
    "vgg11",
]

VGG11_CFG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class BasicBlock(nn.Module):
    """ResNet basic block; the shortcut is a 3x3 conv + BN whenever the shape changes.

    The 3x3 shortcut (rather than 1x1 or zero-padding) follows the paper's released ResNet20.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(planes),
            )
        self.relu2 = nn.ReLU()

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR ResNet20: stem, 3 stages of 3 basic blocks (16w, 32w, 64w channels), GAP, Linear."""

    def __init__(self, width: int = 1, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        planes = [16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, planes[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU()
        stages = []
        in_planes = planes[0]
        for i, p in enumerate(planes):
            blocks = []
            for j in range(3):
                blocks.append(BasicBlock(in_planes, p, stride=2 if (i > 0 and j == 0) else 1))
                in_planes = p
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(planes[2], num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.flatten(self.pool(x)))


def resnet20(width: int = 1, num_classes: int = 10, in_channels: int = 3) -> ResNet20:
    """CIFAR ResNet20 x ``width`` (Kaiming-normal init of convs and the head, as in the paper)."""
    if width < 1:
        raise ValueError(f"width must be a positive integer, got {width!r}")
    return ResNet20(width=width, num_classes=num_classes, in_channels=in_channels)


class VGG(nn.Module):
    """VGG: ``features`` (convs, optional BN, ReLU, max-pools), ``flatten``, ``classifier``."""

    def __init__(
        self,
        cfg: Sequence[int | str],
        num_classes: int = 10,
        batch_norm: bool = False,
        width: int = 1,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            out = int(v) * width
            layers.append(nn.Conv2d(c, out, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU())
            c = out
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.classifier(self.flatten(self.features(x)))


def vgg11(
    num_classes: int = 10, batch_norm: bool = False, width: int = 1, in_channels: int = 3
) -> VGG:
    """CIFAR VGG11 for 32x32 inputs: five conv stages down to 1x1, then ``Linear(512w, classes)``.

    A single Linear head (no 4096-wide MLP), as in the paper's CIFAR VGG11; the flatten after the
    last pool expects 1x1 maps, i.e. 32x32 inputs. Without BN (the paper's setting) convs carry
    biases; with ``batch_norm=True`` they do not (BN supplies the shift). PyTorch default init.
    """
    if width < 1:
        raise ValueError(f"width must be a positive integer, got {width!r}")
    return VGG(VGG11_CFG, num_classes, batch_norm=batch_norm, width=width, in_channels=in_channels)


def mlp(
    in_features: int = 784, hidden: Sequence[int] = (512, 512, 512), num_classes: int = 10
) -> nn.Sequential:
    """Flatten, then ``Linear + ReLU`` per hidden width, then a Linear head.

    Modules are named ``flatten``, ``fc1``/``relu1``, ..., ``head``. PyTorch default init.
    """
    layers: dict[str, nn.Module] = {"flatten": nn.Flatten()}
    prev = in_features
    for i, h in enumerate(hidden, start=1):
        layers[f"fc{i}"] = nn.Linear(prev, h)
        layers[f"relu{i}"] = nn.ReLU()
        prev = h
    layers["head"] = nn.Linear(prev, num_classes)
    return nn.Sequential(OrderedDict(layers))


def _build_resnet20(num_classes: int, in_channels: int, image_size: int, **kw) -> nn.Module:
    return resnet20(num_classes=num_classes, in_channels=in_channels, **kw)


def _build_vgg11(num_classes: int, in_channels: int, image_size: int, **kw) -> nn.Module:
    return vgg11(num_classes=num_classes, in_channels=in_channels, **kw)


def _build_mlp(num_classes: int, in_channels: int, image_size: int, **kw) -> nn.Module:
    kw.setdefault("in_features", in_channels * image_size * image_size)
    return mlp(num_classes=num_classes, **kw)


BUILTINS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": _build_resnet20,
    "vgg11": _build_vgg11,
    "mlp": _build_mlp,
}


def model_names() -> list[str]:
    """Accepted ``build_model`` names: the built-ins, ``timm:`` / ``tv:`` and your own factory."""
    return [*BUILTINS, "timm:NAME", "tv:NAME", "module.path:factory"]


def run_model_kwargs(name: str, width: int, batch_norm: bool) -> dict[str, Any]:
    """The keywords that ``permask run``'s ``width`` and ``batch_norm`` settings give model
    ``name``; ``ValueError`` when a setting was changed for a model that has no such knob (a
    silently ignored setting would put wrong labels on a run's results)."""
    kw: dict[str, Any] = {}
    if name in ("resnet20", "vgg11"):
        kw["width"] = width
    elif width != 1:
        raise ValueError(
            f"width {width} applies to resnet20 and vgg11 only, not {name!r}; drop --width"
        )
    if name == "vgg11":
        kw["batch_norm"] = batch_norm
    elif batch_norm:
        raise ValueError(f"batch_norm applies to vgg11 only, not {name!r}; drop --batch-norm")
    return kw


def check_model_name(name: str) -> None:
    """Raise ``ValueError`` naming the problem when ``build_model`` could not know ``name``.

    Cheap (no weights built, no data needed), so a typo is reported before anything is loaded:

    >>> check_model_name("timm:resnet18")
    >>> check_model_name("timm:resnet181")
    Traceback (most recent call last):
    ...
    ValueError: unknown timm model 'resnet181' (did you mean resnet18, resnet18d, resnet101?); ...
    """
    if name in BUILTINS:
        return
    prefix, _, arch = name.partition(":")
    if prefix not in ("timm", "tv") and prefix and arch:
        _factory(name)
        return
    if prefix == "timm" and arch:
        import timm

        if not timm.is_model(arch):
            raise ValueError(_unknown("timm", arch, timm.list_models(), "timm.list_models()"))
        return
    if prefix == "tv" and arch:
        import torchvision

        known = torchvision.models.list_models()
        if arch.lower() not in known:
            lister = "torchvision.models.list_models()"
            raise ValueError(_unknown("torchvision", arch, known, lister))
        return
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(model_names())}")


def _factory(spec: str) -> Callable[..., nn.Module]:
    """The callable named by ``module.path:factory`` (``ValueError`` naming what is missing)."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"model {spec!r}: cannot import {module_name!r} ({err})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"model {spec!r}: {module_name} has no callable {attr!r}")
    return fn


def _unknown(zoo: str, arch: str, known: list[str], lister: str) -> str:
    close = difflib.get_close_matches(arch.lower(), known, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return f"unknown {zoo} model {arch!r}{hint}; {lister} lists the names"


def build_model(
    name: str, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, **kw
) -> nn.Module:
    """Build a model by name with freshly initialised weights (seed with ``torch.manual_seed``).

    ``name`` is a built-in (``resnet20``, ``vgg11``, ``mlp``), ``timm:NAME`` (``timm.create_model``
    with ``pretrained=False``), ``tv:NAME`` (``torchvision.models.get_model``, ``weights=None``)
    or ``module.path:factory``, your own callable, called with the extra keywords alone (it
    decides its classes and input channels). ``image_size`` only sets the MLP's input width
    (``in_channels * image_size**2``) unless ``in_features`` is given. Extra keywords go to the
    constructor (e.g. ``width=4``).
    """
    check_model_name(name)
    if name in BUILTINS:
        return BUILTINS[name](num_classes, in_channels, image_size, **kw)
    prefix, _, arch = name.partition(":")
    if prefix not in ("timm", "tv"):
        model = _factory(name)(**kw)
        if not isinstance(model, nn.Module):
            raise ValueError(f"model {name!r} returned {type(model).__name__}, not an nn.Module")
        return model
    if prefix == "timm":
        import timm

        return timm.create_model(
            arch, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kw
        )
    import torchvision  # "tv:" (check_model_name left no other case)

    if in_channels != 3:
        raise ValueError(f"torchvision models take 3 input channels, got {in_channels}")
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kw)
