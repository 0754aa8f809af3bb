"""The training forward under ``torch.compile``: :class:`CompiledForward`.

``compile`` settings (:data:`COMPILE`): ``off`` (eager), ``inductor`` (torch's default compiler:
C++ on the CPU, Triton on CUDA), ``inductor-cudagraphs`` (the same with CUDA graphs replaying
each fixed-shape forward and backward, torch's ``mode="reduce-overhead"``; CUDA only) and
``aot_eager`` (the traced graph run by eager kernels: no compiler needed, for checking a model
compiles). The model is compiled whole (``fullgraph=True``) with static shapes, so a last
partial batch compiles once more. The optimizer step stays eager: ``MaskedOptimizer`` keeps
pruned weights exactly 0 under every setting.

A compile failure, or a graph break (which ``fullgraph`` turns into an error), falls back to
the eager model for the rest of that training with a one-line ``RuntimeWarning`` naming the
cause. Torch compiles before it runs any of the frame, so the step that failed is then run
eagerly from the same state: no step is lost or run twice. A compiled model computes in the
same precision as eager but may round differently (fused kernels); how far the weights drift is
measured in tests/test_compiled.py and docs/pipeline.md.

Example::

    step_forward = CompiledForward(model, "aot_eager")
    loss = loss_fn(step_forward(x), y)  # compiled on the first call, eager if that fails
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

__all__ = ["COMPILE", "CompiledForward"]

#: ``compile`` setting -> ``torch.compile`` arguments (None: eager).
COMPILE: dict[str, dict[str, Any] | None] = {
    "off": None,
    "inductor": {"backend": "inductor"},
    "inductor-cudagraphs": {"backend": "inductor", "mode": "reduce-overhead"},
    "aot_eager": {"backend": "aot_eager"},
}


class CompiledForward:
    """Call ``net`` compiled as ``setting`` says; eager after a compile failure (one warning)."""

    def __init__(self, net: nn.Module, setting: str) -> None:
        if setting not in COMPILE:
            raise ValueError(f"compile must be one of {', '.join(COMPILE)}, got {setting!r}")
        self.net, self.setting = net, setting
        options = COMPILE[setting]
        self.compiled = None
        if options is not None:
            self.compiled = torch.compile(net, fullgraph=True, dynamic=False, **options)

    def __call__(self, *args: Any) -> Any:
        if self.compiled is None:
            return self.net(*args)
        try:
            return self.compiled(*args)
        except torch._dynamo.exc.TorchDynamoException as err:
            self.compiled = None
            cause = (str(err).strip().splitlines() or [""])[0][:200]
            warnings.warn(
                f"compile={self.setting} failed ({type(err).__name__}: {cause}); this training "
                "continues eagerly (use --compile off to skip compiling)",
                RuntimeWarning,
                stacklevel=2,
            )
            return self.net(*args)
