"""The one error every tracing failure raises."""

from __future__ import annotations

__all__ = ["TraceError", "InputMismatch"]


class TraceError(ValueError, RuntimeError):
    """The model could not be traced: control flow that depends on tensor values, a module that
    fails to trace, or example inputs that do not fit the model. The message names the module or
    node and the fix. A ``ValueError`` (bad input) and a ``RuntimeError`` (what it was before)."""


class InputMismatch(TraceError):
    """The example inputs do not fit the model (a captured graph failed to run on them, or their
    number is wrong): another front end would fail the same way, so ``trace`` does not try one."""
