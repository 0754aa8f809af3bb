"""The experiment's one error type, apart so that every module can raise it without importing
the configuration."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one line, for the command line."""
