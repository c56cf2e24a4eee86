"""What both runners (V1 in ``runner.py``, Model Runner V2 in
``runner_v2.py``) derive from a step's ``MultiverseStep`` and their batch:
the position shift of each scheduled token and the masked rows handed to the
attention backend. Plain numpy over the batch's layout, so that the two
runners differ only in where they read that layout."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from vllm_multiverse.kernels.masked_attention import MaskedBatch
from vllm_multiverse.kernels.packed_mask import MaskedRow
from vllm_multiverse.structure import Rect


def position_deltas(
    positions: Mapping[str, int | list[int]],
    req_ids: Sequence[str],
    query_start: np.ndarray,
    seq_lens: np.ndarray,
    total: int,
) -> np.ndarray | None:
    """Token index minus Multiverse position, for each scheduled token of
    the batch (vLLM's positions are token indices); None if all zero."""
    if not positions:
        return None
    delta = np.zeros(total, dtype=np.int64)
    for i, rid in enumerate(req_ids):
        pos = positions.get(rid)
        if pos is None:
            continue
        a, b = int(query_start[i]), int(query_start[i + 1])
        if isinstance(pos, int):
            delta[a:b] = pos
        else:
            start = int(seq_lens[i]) - (b - a)
            delta[a:b] = np.arange(start, start + b - a) - np.asarray(pos, dtype=np.int64)
    return delta


class KernelBlockIds(Sequence):
    """Each masked row's kernel block ids, read off the step's block table
    when a route asks for them (the CPU kernel takes vLLM's table and never
    does). ``read_blocks(i, n)``: the first ``n`` scheduler block ids of the
    batch's row ``i``."""

    def __init__(
        self,
        read_blocks: Callable[[int, int], np.ndarray],
        where: list[tuple[int, int]],
        block_size: int,
        kernel_block: int,
    ) -> None:
        self.read_blocks, self.where = read_blocks, where
        self.block_size, self.kernel_block = block_size, kernel_block
        self._rows: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.where)

    def __getitem__(self, j: int) -> np.ndarray:
        ids = self._rows.get(j)
        if ids is None:
            i, end = self.where[j]
            # The table holds scheduler blocks; the layers' caches count kernel
            # blocks, each scheduler block holding `split` of them in order.
            split = self.block_size // self.kernel_block
            blocks = np.asarray(self.read_blocks(i, -(-end // self.block_size)), dtype=np.int64)
            ids = self._rows[j] = (blocks[:, None] * split + np.arange(split)).reshape(-1)
        return ids


def masked_batch(
    masks: Mapping[str, list[Rect]],
    req_ids: Sequence[str],
    query_start: np.ndarray,
    seq_lens: np.ndarray,
    read_blocks: Callable[[int, int], np.ndarray],
    block_size: int,
    kernel_block: int,
) -> MaskedBatch:
    """Every request of the step (the whole-step routes compute them all),
    the ones in ``masks`` marked masked."""
    rows, offsets, where, masked = [], [], [], []
    for i, rid in enumerate(req_ids):
        rects = masks.get(rid)
        if rects is not None:
            masked.append(i)
        a, q_len, end = int(query_start[i]), int(query_start[i + 1] - query_start[i]), int(seq_lens[i])
        rows.append(MaskedRow(end - q_len, q_len, tuple(rects or ())))
        offsets.append(a)
        where.append((i, end))
    block_ids = KernelBlockIds(read_blocks, where, block_size, kernel_block)
    return MaskedBatch(rows, offsets, block_ids, kernel_block, masked)
