"""Where the tests find real data, and skip marks for when it is absent.

``$PERMASK_DATA`` if set, else ``../shared/data`` beside the project root (as CI lays it out).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

DATA = Path(
    os.environ.get("PERMASK_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")
)
needs_mnist = pytest.mark.skipif(
    not (DATA / "MNIST" / "raw").is_dir(), reason=f"real MNIST not found under {DATA}"
)
needs_cifar = pytest.mark.skipif(
    not (DATA / "cifar10" / "test").is_dir(), reason=f"CIFAR-10 JPEGs not found under {DATA}"
)


@pytest.fixture
def one_thread():
    """One torch thread: on a shared 2-core machine, spinning threads of parallel jobs collide."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sigkill_once_written(proc, path: Path, timeout: float, settle: float = 0.0) -> None:
    """SIGKILL ``proc`` once it has written ``path`` (plus ``settle`` seconds); fail if it never
    does within ``timeout`` or exits first."""
    import signal
    import time

    try:
        deadline = time.monotonic() + timeout
        while not path.exists():
            assert proc.poll() is None, f"process exited before writing {path}"
            assert time.monotonic() < deadline, f"{path} never written"
            time.sleep(0.01)
        time.sleep(settle)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
