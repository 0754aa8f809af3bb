"""The paper's experiment: models, data, training, and the resumable pipeline :func:`run`."""

from .config import ConfigError, RunConfig, load_config
from .pipeline import run
from .report import Results

__all__ = ["ConfigError", "Results", "RunConfig", "load_config", "run"]
