"""What one scheduler step tells the workers about Multiverse requests."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm_multiverse.structure.masks import Rect


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
