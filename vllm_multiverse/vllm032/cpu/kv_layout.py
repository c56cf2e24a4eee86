"""vLLM 0.32.0's CPU KV cache layout for the "vec" instruction set, in one
place: the merge's token copies and the masked attention's gather read and
write it.

vLLM's CPU attention stores each layer as [kernel blocks, kv_heads,
kernel block size, 2 * head_dim] on the outside, but packs the inside of a
block per instruction set: for "vec" (x86 without AMX, float32), a head's
keys are stored transposed ([head_dim, block_size]) and its values
token-major ([block_size, head_dim]). ``validate.py`` refuses every other
packing; the tests check this one against vLLM's own
``cpu_attn_reshape_and_cache``. Slots are ``block * block_size + offset`` in
scheduler blocks; a scheduler block holds whole kernel blocks, so the
kernel block and offset of a slot are its quotient and remainder by the
kernel block size, which is read off the tensor.
"""

from __future__ import annotations

import torch


def copy_vec_token_slots(kv_caches: list[torch.Tensor], copies: list[tuple[int, int]]) -> None:
    """Copy the K and V of each (src_slot, dst_slot) pair, in every layer."""
    if not copies:
        return
    src = torch.tensor([s for s, _ in copies], dtype=torch.long)
    dst = torch.tensor([d for _, d in copies], dtype=torch.long)
    seen: set[int] = set()
    for kv in kv_caches:
        if kv.data_ptr() in seen:  # layers sharing one cache
            continue
        seen.add(kv.data_ptr())
        nb, heads, n, c = kv.shape
        d = c // 2
        sb, so, db, do = src // n, src % n, dst // n, dst % n
        keys = kv.view(nb, heads, 2, d, n)
        values = kv.view(nb, heads, 2, n, d)
        keys[db, :, 0, :, do] = keys[sb, :, 0, :, so]
        values[db, :, 1, do, :] = values[sb, :, 1, so, :]


def gather_kv(kv_cache: torch.Tensor, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of each row's tokens, each [rows, blocks * block_size,
    kv_heads, head_dim]; ``blocks``: kernel block ids [rows, blocks]."""
    _, heads, bs, c = kv_cache.shape
    d = c // 2
    rows, nb = blocks.shape
    blk = kv_cache[blocks.reshape(-1).long()].view(rows, nb, heads, 2, bs * d)
    k = blk[:, :, :, 0].reshape(rows, nb, heads, d, bs).permute(0, 1, 4, 2, 3).reshape(rows, nb * bs, heads, d)
    v = blk[:, :, :, 1].reshape(rows, nb, heads, bs, d).permute(0, 1, 3, 2, 4).reshape(rows, nb * bs, heads, d)
    return k, v
