"""What one scheduler step tells the workers about Multiverse requests."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from vllm_multiverse.structure.masks import Rect
from vllm_multiverse.tree.registry import Trees


@dataclass
class MultiverseStep:
    # Request -> one offset to subtract from each scheduled token's index,
    # or the positions of its scheduled tokens; absent: the index is the position.
    positions: dict[str, int | list[int]] = field(default_factory=dict)
    # Request -> hidden rectangles of its scheduled queries (token indices).
    masks: dict[str, list[Rect]] = field(default_factory=dict)
    # Request -> (first index, tokens): the runner's copy of the request's
    # tokens from that index on (it only knows the tokens it sampled).
    token_fixes: dict[str, tuple[int, list[int]]] = field(default_factory=dict)
    # (src slot, dst slot) KV copies of merges, in every layer, before the forward.
    kv_copies: list[tuple[int, int]] = field(default_factory=list)


def build(trees: Trees, scheduled: Mapping[str, int], computed: Callable[[str], int]) -> MultiverseStep:
    """Positions and masks of the scheduled token ranges, the written text
    the runner has not seen, and the queued KV copies. ``scheduled``:
    request -> how many tokens the step computes, the last of those it has
    KV for after the step; ``computed(request)``: how many it has KV for
    after the step (asked only of requests that need positions or masks)."""
    step = MultiverseStep()
    tracks = trees.tracks
    for rid, n in scheduled.items():
        track = tracks.get(rid)
        # A request that has never been in a Path has no hidden ranges,
        # and none shifted: nothing to send (most requests, most steps).
        if track is None or not (track.hidden or track.run_delta or track.run_start):
            continue
        end = computed(rid)
        start = end - n
        if track.hidden:
            rects = track.rects_for(start, end)
            if rects:
                step.masks[rid] = rects
                trees.stats["masked_tokens"] += n
        pos = track.positions_for(start, end)
        if pos is not None:
            step.positions[rid] = pos
    if trees.to_fix:
        for rid in [r for r in trees.to_fix if r in scheduled or r not in tracks]:
            trees.to_fix.discard(rid)
            track = tracks.get(rid)
            if track is not None and track.fix_from is not None:
                step.token_fixes[rid] = (track.fix_from, track.tokens[track.fix_from :].tolist())
                track.fix_from = None
    step.kv_copies = trees.copies.take()
    return step
