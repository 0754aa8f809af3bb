"""The matching methods by name: one registry that ``align``, ``merge``, the run's config and
the command line all read, so a method is named, checked and described in one place.

A matcher takes a :class:`~permask.match.request.MatchRequest` and returns the permutation and
an :class:`~permask.match.info.AlignInfo`. Example::

    from permask.match.matchers import get_matcher, matcher_names

    matcher_names()                   # ('activation', 'weight', 'ste')
    get_matcher("weight").needs_data  # False
    get_matcher("wieght")             # ValueError: unknown method 'wieght'; choose ...
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from ..graph import Permutation
from .by_activation import activation_matching, on_device
from .info import AlignInfo
from .request import MatchRequest
from .ste import ste_matching
from .ties import warn_ties
from .weight import weight_matching

__all__ = ["Matcher", "register_matcher", "get_matcher", "matcher_names"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Matcher:
    """A matching method: its ``name``, whether it reads data (``needs_data``), a one-line
    ``summary`` for help texts, the function that ``run``\\ s it, and whether it ``learns``
    from the loss, starting at weight matching's permutation (then
    :func:`permask.merging.turned_onto` finds its rounds by weight matching and runs this
    matcher once, after the maps)."""

    name: str
    needs_data: bool
    summary: str
    run: Callable[[MatchRequest], tuple[Permutation, AlignInfo]]
    learns: bool = False


_MATCHERS: dict[str, Matcher] = {}


def register_matcher(matcher: Matcher) -> Matcher:
    """Add ``matcher`` (a later one of the same name replaces it); returns it."""
    _MATCHERS[matcher.name] = matcher
    return matcher


def matcher_names() -> tuple[str, ...]:
    return tuple(_MATCHERS)


def get_matcher(name: str) -> Matcher:
    """The matcher called ``name``; ``ValueError`` naming the choices for any other name."""
    if name not in _MATCHERS:
        choices = " or ".join(repr(n) for n in _MATCHERS)
        raise ValueError(f"unknown method {name!r}; choose {choices}")
    return _MATCHERS[name]


def _weight(req: MatchRequest) -> tuple[Permutation, AlignInfo]:
    res = weight_matching(
        on_device(req.model_a, req.device).state_dict(),
        on_device(req.model_b, req.device).state_dict(),
        req.graph, seed=req.seed, solver=req.solver,
    )  # fmt: skip
    log.info("weight matching: %d sweeps, objective %.6g", res.iterations, res.objective)
    info = AlignInfo("weight", 0.0, len(req.graph), objective=res.objective,
                     iterations=res.iterations, margins=res.margins, ties=res.ties)  # fmt: skip
    warn_ties(res.ties, {})
    return Permutation(res.perms), info


register_matcher(Matcher(
    "activation", True, "correlate A's and B's units on data (the paper's)", activation_matching
))  # fmt: skip
register_matcher(Matcher("weight", False, "Git Re-Basin weight matching, no data", _weight))
register_matcher(Matcher(
    "ste", True, "Git Re-Basin straight-through: learn the midpoint's loss", ste_matching,
    learns=True,
))  # fmt: skip
