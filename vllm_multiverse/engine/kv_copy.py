"""Token-granular KV copies for the merge, per KV cache layout."""

from __future__ import annotations

import torch


def copy_token_slots(kv_caches: list[torch.Tensor], copies: list[tuple[int, int]], block_size: int) -> None:
    """Copy the K and V of each (src_slot, dst_slot) pair, in every layer.

    vLLM's CPU attention stores each layer as [blocks, kv_heads, block_size,
    2 * head_dim] on the outside, but packs the inside of a block per
    instruction set: for float32 ("vec"), a head's keys are stored transposed
    ([head_dim, block_size]) and its values token-major ([block_size,
    head_dim]). Checked end to end against a recompute in the engine tests.
    """
    if not copies:
        return
    src = torch.tensor([s for s, _ in copies], dtype=torch.long)
    dst = torch.tensor([d for _, d in copies], dtype=torch.long)
    sb, so = src // block_size, src % block_size
    db, do = dst // block_size, dst % block_size
    for kv in kv_caches:
        nb, heads, n, c = kv.shape
        d = c // 2
        keys = kv.view(nb, heads, 2, d, n)
        values = kv.view(nb, heads, 2, n, d)
        keys[db, :, 0, :, do] = keys[sb, :, 0, :, so]
        values[db, :, 1, do, :] = values[sb, :, 1, so, :]
