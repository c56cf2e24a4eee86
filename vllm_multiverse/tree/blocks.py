"""What the tree asks of a KV block pool.

Blocks are opaque to the tree: it only counts, keeps and hands back
references. (A branch's table, on its parent's blocks, is made by the host
when it starts the branch: that is vLLM's own prefix sharing.) vLLM's pool
implements this in ``vllm032/kv.py``; the unit tests implement it with a
dictionary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

Block = Any


class BlockOps(Protocol):
    block_size: int

    def detach(self, request_id: str) -> list[Block]:
        """Take a finishing request's table out of the pool's tables; its
        references now belong to the caller."""

    def install(self, request_id: str, table: list[Block], num_cached_blocks: int) -> list[Block]:
        """Make ``table`` (whose references the caller hands over) the
        request's table, its first ``num_cached_blocks`` already published
        in the prefix cache; returns the old table, whose references the
        caller now owns."""

    def allocate(self, n: int) -> list[Block] | None:
        """``n`` fresh blocks, one reference each, or None if they are not free."""

    def retain(self, blocks: Sequence[Block]) -> None:
        """One more reference on each block."""

    def release(self, blocks: Sequence[Block]) -> None:
        """One reference less on each block (the first released goes first)."""

    def num_free(self) -> int: ...

    def block_id(self, block: Block) -> int: ...

    def freeable(self, request_ids: Sequence[str], stashes: Sequence[Sequence[Block]]) -> int:
        """Blocks that would become free if these tables and stashes went."""

    def blocks_short(self, running: Sequence[str]) -> int:
        """Blocks the running requests' next token each needs beyond the
        free ones (a prefill's further chunks are the host's to fit)."""
