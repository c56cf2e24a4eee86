"""``Trees``: every request tree of one engine, the state the policy modules
(:mod:`.sampling`, :mod:`.lifecycle`, :mod:`.merge`, :mod:`.pressure`,
:mod:`.live`, :mod:`.step`) read and change.

Invariant: every KV reference the trees hold is in a branch result (a
finished Path waiting for its merge) or in the copy queue, and they hold
nothing once no request is left.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from vllm_multiverse.structure import MultiverseTokens, StructureConfig, StructureState
from vllm_multiverse.tree.blocks import BlockOps
from vllm_multiverse.tree.copies import CopyQueue
from vllm_multiverse.tree.fork import Caps, Fork
from vllm_multiverse.tree.track import Limits, Track

STAT_NAMES = ("forks", "merges", "fallbacks", "rollbacks", "parallel_tokens", "preemptions", "masked_tokens")


@dataclass(frozen=True)
class Held:
    """A tree preempted for memory, kept out of the host's queue: readmitted
    at once it would take back the blocks its elders need, fork again, and
    no tree would finish."""

    root: str
    roots_finished: int  # trees finished when it was preempted
    arrival: float
    order: int


class Trees:
    def __init__(
        self, tokens: MultiverseTokens, structure: StructureConfig, config: Caps, blocks: BlockOps, max_model_len: int
    ) -> None:
        self.tokens = tokens
        self.structure = structure
        self.config = config
        self.blocks = blocks
        self.max_model_len = max_model_len
        self.tracks: dict[str, Track] = {}
        self.forks: dict[str, Fork] = {}  # parent request id -> its open fork
        self.held: list[Held] = []  # trees preempted for memory, out of the host's queue
        self.copies = CopyQueue(blocks)
        # Requests whose runner copy of the tokens needs the written text.
        self.to_fix: set[str] = set()
        # Client request -> tokens of its open fork's text already sent (live).
        self.live_sent: dict[str, int] = {}
        self.stats: Counter[str] = Counter({name: 0 for name in STAT_NAMES})
        self.paths_per_fork: Counter[int] = Counter()
        self.roots_finished = 0
        self._order = itertools.count()

    def add(
        self,
        request_id: str,
        prompt: Sequence[int],
        limits: Limits,
        *,
        sequential: bool,
        client: str | None = None,
        seed: int | None = None,
        keep_logprobs: bool = False,
        priority: int = 0,
        arrival: float = 0.0,
    ) -> Track:
        """A client request arrives."""
        track = Track(
            StructureState(self.tokens, self.structure),
            root=request_id,
            client=client or request_id,
            limits=limits,
            num_prompt=len(prompt),
            order=next(self._order),
            priority=priority,
            arrival=arrival,
            sequential=sequential,
            seed=seed,
            keep_logprobs=keep_logprobs,
        )
        track.extend(prompt)
        track.arm()
        self.tracks[request_id] = track
        return track

    def preempted(self, request_id: str) -> None:
        """The host freed the request's KV; it recomputes it from its tokens."""
        self.stats["preemptions"] += 1
        self.copies.drop(request_id)
        track = self.tracks.get(request_id)
        if track is not None:
            track.arm()  # a parent preempted at its fork forks again

    def tree_forks(self, root: str) -> list[Fork]:
        return [f for f in self.forks.values() if f.root == root]
