"""The Multiverse mask of a step, in the compact form the scheduler sends.

The structure rule says which KV ranges each token must not see
(``StructureState.hidden_ranges``). A step sends, per request that needs it,
rectangles ``(q0, q1, k0, k1)`` in token indices: queries ``q0..q1-1`` do not
see keys ``k0..k1-1``. Everything else is causal. No dense n x n matrix is
kept; the runner expands only the scheduled rows.
"""

from __future__ import annotations

from collections.abc import Mapping

Rect = tuple[int, int, int, int]
Hidden = tuple[tuple[int, int], ...]


def rects_for(hidden: Mapping[int, Hidden], start: int, end: int) -> list[Rect]:
    """The hidden rectangles of queries ``start..end-1``; tokens in a run
    with the same hidden ranges share one rectangle per range."""
    rects: list[Rect] = []
    run_start, run = start, None
    for q in range(start, end + 1):
        cur = hidden.get(q) if q < end else None
        if cur != run:
            if run:
                rects.extend((run_start, q, k0, k1) for k0, k1 in run)
            run_start, run = q, cur
    return rects
