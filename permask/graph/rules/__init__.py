"""Built-in op rules, one file per family; importing this package registers them all, except
the rules for timm's layers: :func:`load_timm_rules` registers those on the first trace, so that
``import permask`` does not import timm (about 2.7 s)."""

from . import aten, conv, elementwise, linear, norm, pool, reduce, shape  # noqa: F401


def load_timm_rules() -> None:
    """Register the rules for timm's leaf modules and activations (once; a no-op without timm).
    A rule the user registered earlier for one of those classes is kept."""
    from . import timm_layers  # noqa: F401
