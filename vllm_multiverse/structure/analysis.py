"""Batch form of the structure rule: a whole sequence at once.

:func:`analyze` runs the rule of :mod:`.state` over a sequence and keeps the
answer for every token. The visibility rule comes out in two forms:

- :meth:`Structure.hidden_rects`: the compact form, rectangles
  ``(q_start, q_end, k_start, k_end)`` of (query, key) pairs that causal
  attention would allow and Multiverse attention forbids (a Path's rows times
  an earlier sibling Path's columns). Attention code uses it, or
  :meth:`Structure.visible_ranges`, without building a dense matrix.
- :meth:`Structure.dense_mask`: causal minus those rectangles, built with
  whole-array operations (a 4,096-token mask takes a few milliseconds).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vllm_multiverse.structure.incremental import (
    Event,
    Note,
    StructureConfig,
    StructureState,
)
from vllm_multiverse.structure.tokens import MultiverseTokens


@dataclass(frozen=True)
class Span:
    """One Path: token indices [start, end), its <Path> through its tail."""

    block: int
    path: int
    start: int
    end: int
    depth: int


@dataclass
class Structure:
    positions: np.ndarray  # int64 [n]: position id of every token
    block: np.ndarray  # int64 [n]: uid of the innermost block, -1 outside
    part: np.ndarray  # int8 [n]: a Part value relative to that block
    chains: list[tuple[tuple[int, int], ...]]  # open Path per enclosing block
    spans: list[Span]
    events: list[Event]
    notes: list[Note]
    open_blocks: int  # blocks still open after the last token

    @property
    def well_formed(self) -> bool:
        """Nothing fell back to causal, and every block was closed."""
        return not self.notes and self.open_blocks == 0

    def __len__(self) -> int:
        return len(self.positions)

    def hidden_rects(self) -> list[tuple[int, int, int, int]]:
        by_block: dict[int, list[Span]] = {}
        for s in self.spans:
            by_block.setdefault(s.block, []).append(s)
        rects = []
        for sibs in by_block.values():
            for k, later in enumerate(sibs):
                for earlier in sibs[:k]:
                    rects.append((later.start, later.end, earlier.start, earlier.end))
        return rects

    def visible_ranges(self, q: int) -> list[tuple[int, int]]:
        """KV ranges [start, end) query ``q`` sees, in order."""
        hidden = sorted((k0, k1) for q0, q1, k0, k1 in self.hidden_rects() if q0 <= q < q1)
        out, cur = [], 0
        for k0, k1 in hidden:
            if k0 > cur:
                out.append((cur, k0))
            cur = max(cur, k1)
        if cur <= q:
            out.append((cur, q + 1))
        return out

    def dense_mask(self) -> np.ndarray:
        """Boolean [n, n]: ``mask[q, k]`` is True where q may attend to k."""
        n = len(self)
        mask = np.tri(n, dtype=bool)
        for q0, q1, k0, k1 in self.hidden_rects():
            mask[q0:q1, k0:k1] = False
        return mask


def analyze(
    token_ids: Sequence[int],
    tokens: MultiverseTokens,
    config: StructureConfig | None = None,
) -> Structure:
    state = StructureState(tokens, config)
    n = len(token_ids)
    positions = np.empty(n, dtype=np.int64)
    block = np.empty(n, dtype=np.int64)
    part = np.empty(n, dtype=np.int8)
    chains: list[tuple[tuple[int, int], ...]] = []
    events: list[Event] = []
    open_spans: dict[tuple[int, int], int] = {}
    spans: list[Span] = []
    depth_of: dict[int, int] = {}
    for i, tok in enumerate(token_ids):
        prev_chain = state.chain
        ev = state.append(int(tok))
        positions[i] = state.position
        block[i] = state.block
        part[i] = state.part
        chains.append(state.chain)
        if state.block >= 0:
            depth_of[state.block] = state.depth
        if ev is not None:
            events.append(ev)
        if state.chain is not prev_chain:
            _track_spans(prev_chain, state.chain, i, open_spans, spans, depth_of)
    for (blk, path), start in open_spans.items():
        spans.append(Span(blk, path, start, n, depth_of.get(blk, 0)))
    spans.sort(key=lambda s: (s.start, s.block))
    return Structure(
        positions, block, part, chains, spans, events, list(state.notes), state.open_blocks
    )


def _track_spans(prev, cur, i, open_spans, spans, depth_of) -> None:
    # A Path joins the chain on its <Path> and leaves it on the first token
    # after its tail, so its span is [join, leave).
    for key in prev:
        if key not in cur:
            start = open_spans.pop(key)
            spans.append(Span(key[0], key[1], start, i, depth_of.get(key[0], 0)))
    for key in cur:
        if key not in open_spans:
            open_spans[key] = i
