"""The experiment's errors, apart so that every module (and the command line, before its heavy
imports) can name them without importing the configuration or the pipeline."""

from __future__ import annotations

__all__ = ["ConfigError", "JobError"]


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one line, for the command line."""


class JobError(RuntimeError):
    """A job (one stage) of a run failed; the message names the stage and its error."""
