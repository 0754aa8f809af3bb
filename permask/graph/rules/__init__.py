"""Built-in op rules, one file per family; importing this package registers them all."""

from . import conv, elementwise, linear, norm, pool, reduce, shape, timm_layers  # noqa: F401
