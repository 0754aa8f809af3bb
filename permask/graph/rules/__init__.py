"""Built-in op rules, one file per family; importing this package registers them all, except
the rules for timm's layers: :func:`load_timm_rules` registers those on a trace once timm is
imported, so that neither ``import permask`` nor tracing a model without timm imports timm
(seconds of import time: docs/benchmarks.md, "Import time")."""

import sys

from . import aten, conv, elementwise, linear, norm, pool, reduce, shape  # noqa: F401


def load_timm_rules() -> None:
    """Register the rules for timm's leaf modules and activations (once), when timm has been
    imported: a model holding timm's layers has imported it, and a model without them does not
    need their rules (nor timm's import, which also pulls in torchvision and torch._dynamo). A
    rule the user registered earlier for one of those classes is kept."""
    if "timm" in sys.modules:
        from . import timm_layers  # noqa: F401
