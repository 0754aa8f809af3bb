"""Hypothesis draws fixed examples under CI (CI=true) so that a run is reproducible."""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
