"""Suite-wide set-up: reproducible hypothesis draws under CI, no writes outside the temp dirs,
and a generated MNIST-format data root that every checkout has."""

import os
import shutil
import tempfile

import pytest
from hypothesis import settings
from shared_data import write_synthetic_mnist

settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

_CACHE_VARS = ("PERMASK_CACHE", "MPLCONFIGDIR")
_saved: dict[str, str | None] = {}


def pytest_configure(config):
    """permask's decode cache and matplotlib's font cache go to a fresh temp dir, not ~/.cache,
    from before collection (imports read them) to the end; subprocesses inherit them."""
    root = tempfile.mkdtemp(prefix="permask-tests-")
    _saved.update({k: os.environ.get(k) for k in _CACHE_VARS}, _root=root)
    os.environ["PERMASK_CACHE"] = os.path.join(root, "permask")
    os.environ["MPLCONFIGDIR"] = os.path.join(root, "matplotlib")


def pytest_unconfigure(config):
    root = _saved.pop("_root", None)
    for key in _CACHE_VARS:
        if _saved.get(key) is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = _saved[key]
    if root:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory):
    """A data root of synthetic digits in MNIST's torchvision layout (10,000 train, 1,000 test)."""
    return write_synthetic_mnist(tmp_path_factory.mktemp("data"))
