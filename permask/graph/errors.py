"""The one error every tracing failure raises."""

from __future__ import annotations

__all__ = ["TraceError"]


class TraceError(ValueError, RuntimeError):
    """The model could not be traced: control flow that depends on tensor values, a module that
    fails to trace, or example inputs that do not fit the model. The message names the module or
    node and the fix. A ``ValueError`` (bad input) and a ``RuntimeError`` (what it was before)."""
