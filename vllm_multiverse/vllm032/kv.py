"""Fork and merge block operations on vLLM 0.32's KV cache manager.

The engine runs one full-attention KV cache group (``validate.py`` refuses
the rest, and checks what vLLM built), so a request's blocks are
``single_type_managers[0].req_to_blocks[id]``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

from vllm.v1.core.kv_cache_manager import KVCacheBlocks

if TYPE_CHECKING:
    from vllm.v1.core.block_pool import KVCacheBlock
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.request import Request


class VllmBlocks:
    """:class:`vllm_multiverse.tree.BlockOps` over a V1 scheduler's KV cache."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._requests = scheduler.requests
        self._manager = scheduler.kv_cache_manager
        self._pool = self._manager.block_pool
        self._group = self._manager.coordinator.single_type_managers[0]
        self.block_size = scheduler.block_size

    def share_prefix(self, parent_id: str, child: Request, num_tokens: int) -> bool:
        """Allocate the child's slots on the parent's computed blocks (vLLM
        copies a partial last block on write)."""
        blocks = self._manager.get_blocks(parent_id).blocks
        shared = KVCacheBlocks(tuple(list(g[: -(-num_tokens // self.block_size)]) for g in blocks))
        got = self._manager.allocate_slots(child, 0, num_new_computed_tokens=num_tokens, new_computed_blocks=shared)
        return got is not None

    def detach(self, request_id: str) -> list[KVCacheBlock]:
        return self._manager.pop_blocks_for_free(self._requests[request_id])

    def install(self, request_id: str, table: list[KVCacheBlock], num_cached_blocks: int) -> list[KVCacheBlock]:
        old = self._group.req_to_blocks[request_id]
        self._group.req_to_blocks[request_id] = table
        self._group.num_cached_block[request_id] = num_cached_blocks
        return list(old)

    def allocate(self, n: int) -> list[KVCacheBlock] | None:
        if n > self._pool.get_num_free_blocks():
            return None
        return self._pool.get_new_blocks(n) if n else []

    def retain(self, blocks: Sequence[KVCacheBlock]) -> None:
        self._pool.touch(blocks)

    def release(self, blocks: Sequence[KVCacheBlock]) -> None:
        self._pool.free_blocks(blocks)

    def num_free(self) -> int:
        return self._pool.get_num_free_blocks()

    @staticmethod
    def block_id(block: KVCacheBlock) -> int:
        return block.block_id

    def table(self, request_id: str) -> list[KVCacheBlock]:
        return self._group.req_to_blocks.get(request_id, [])

    def freeable(self, request_ids: Sequence[str], stashes: Sequence[Sequence[KVCacheBlock]]) -> int:
        refs: Counter[int] = Counter()
        by_id = {}
        for blocks in [self.table(rid) for rid in request_ids] + list(stashes):
            for block in blocks:
                refs[block.block_id] += 1
                by_id[block.block_id] = block
        return sum(1 for bid, n in refs.items() if not by_id[bid].is_null and by_id[bid].ref_cnt == n)

    def blocks_short(self, running: Sequence[str]) -> int:
        """Blocks the running requests' next token each needs beyond the free
        ones (a prefill's further chunks are vLLM's to fit)."""
        need = 0
        for rid in running:
            have = len(self._group.req_to_blocks.get(rid, ()))
            need += max(0, -(-(self._requests[rid].num_computed_tokens + 1) // self.block_size) - have)
        return need - self._pool.get_num_free_blocks()
