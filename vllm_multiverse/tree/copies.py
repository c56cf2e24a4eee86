"""The merge's KV copies, and the references that keep them safe.

A merge queues token copies into fresh blocks of the merged request; the
workers run them before the next forward. Until the step that runs them is
done, the destination blocks and the source Paths' blocks keep one
reference of the tree's own, whatever happens to the merged request in
between (an abort, a preemption): otherwise the pool could hand a freed
destination to another request in that very step, and the pending copy
would overwrite it. Copies not sent yet are dropped with their request.
"""

from __future__ import annotations

from vllm_multiverse.tree.blocks import Block, BlockOps


class CopyQueue:
    def __init__(self, blocks: BlockOps) -> None:
        self._blocks = blocks
        # Merged request -> (its copies, the references held for them).
        self._queued: dict[str, tuple[list[tuple[int, int]], list[list[Block]]]] = {}
        self._in_flight: list[list[Block]] = []

    def add(self, request_id: str, copies: list[tuple[int, int]], holds: list[list[Block]]) -> None:
        """Queue a merge's copies; ``holds`` are references handed to the queue."""
        old, old_holds = self._queued.get(request_id, ([], []))
        self._queued[request_id] = (old + copies, old_holds + holds)

    def take(self) -> list[tuple[int, int]]:
        """The copies for the step being scheduled."""
        copies: list[tuple[int, int]] = []
        for queued, holds in self._queued.values():
            copies.extend(queued)
            self._in_flight.extend(holds)
        self._queued.clear()
        return copies

    def step_done(self) -> None:
        """The step that ran the taken copies is done."""
        for blocks in self._in_flight:
            self._blocks.release(blocks[::-1])
        self._in_flight = []

    def drop(self, request_id: str) -> None:
        """Forget a request's copies not sent yet (its KV is gone)."""
        _, holds = self._queued.pop(request_id, ([], []))
        for blocks in holds:
            self._blocks.release(blocks[::-1])

    def drop_all(self) -> None:
        for rid in list(self._queued):
            self.drop(rid)

    def holds(self) -> list[list[Block]]:
        return [b for _, holds in self._queued.values() for b in holds] + self._in_flight

    def __contains__(self, request_id: str) -> bool:
        """Whether copies into this request's blocks are queued."""
        return request_id in self._queued

    def __bool__(self) -> bool:
        return bool(self._queued or self._in_flight)
