"""The float32 CPU KV cache layout (vLLM 0.32.0), in one place: the merge's
token copies and the masked attention's gather read and write it.

vLLM's CPU attention stores each layer as [blocks, kv_heads, block_size,
2 * head_dim] on the outside, but packs the inside of a block per
instruction set: for float32 ("vec"), a head's keys are stored transposed
([head_dim, block_size]) and its values token-major ([block_size, head_dim]).
Checked end to end against the reference in the engine tests.
"""

from __future__ import annotations

import torch


def copy_token_slots(kv_caches: list[torch.Tensor], copies: list[tuple[int, int]], block_size: int) -> None:
    """Copy the K and V of each (src_slot, dst_slot) pair, in every layer."""
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


def gather_kv(kv_cache: torch.Tensor, block_row: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of a request's tokens 0..n-1, each [n, kv_heads, head_dim]."""
    _, heads, bs, c = kv_cache.shape
    d = c // 2
    nb = -(-n // bs)
    blk = kv_cache[block_row[:nb].long()].view(nb, heads, 2, bs * d)
    k = blk[:, :, 0].reshape(nb, heads, d, bs).permute(0, 3, 1, 2).reshape(nb * bs, heads, d)[:n]
    v = blk[:, :, 1].reshape(nb, heads, bs, d).permute(0, 2, 1, 3).reshape(nb * bs, heads, d)[:n]
    return k, v
