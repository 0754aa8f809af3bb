"""The sparse-training methods a run compares: :data:`METHODS`.

Each method trains a sparse model from a rewind point w^k (epoch k of dense A or B) with a mask
from IMP on A, for the same epochs and with the same data order; they differ only in where
the start comes from:

==================  ============  =========  ==================================================
method              weights from  mask       signs
==================  ============  =========  ==================================================
``lth``             w_A^k         m_A        A's own (the lottery ticket)
``permuted``        w_B^k         pi(m_A)    B's own (the paper's method)
``naive``           w_B^k         m_A        B's own (the baseline it beats)
``naive+signs``     w_B^k         m_A        of w_A^k (sign transfer)
``permuted+signs``  w_B^k         pi(m_A)    of pi(w_A^k) (sign transfer after alignment)
==================  ============  =========  ==================================================

The sign methods take |w_B^k| with the signs of A's weights at the same rewind point k
(:func:`permask.sparse.transfer_signs`), the setting of Zhou et al. (2019), where the signs of a
ticket's start, not the trained network's, made it trainable. "Find A Winning Sign" (ICLR 2025)
moves the signs of the *trained* sparse network instead; that needs A's sparse training first
and gives the method what the others do not get, so the pipeline uses the rewind point for every
method alike (docs/pipeline.md, "Methods").
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["METHODS", "PAPER_METHODS", "Method"]


@dataclass(frozen=True)
class Method:
    """Where a sparse training starts: ``init`` "A" or "B" (whose rewind weights), ``aligned``
    (the mask, and the signs if any, moved by pi) and ``signs`` (A's signs on B's magnitudes)."""

    name: str
    init: str
    aligned: bool = False
    signs: bool = False


#: Every method, in the order a run trains them.
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("lth", "A"),
        Method("permuted", "B", aligned=True),
        Method("naive", "B"),
        Method("naive+signs", "B", signs=True),
        Method("permuted+signs", "B", aligned=True, signs=True),
    )
}

#: The paper's comparison, the default of ``methods``.
PAPER_METHODS = ("lth", "permuted", "naive")
