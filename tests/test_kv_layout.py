"""The CPU KV layout the merge's copy and the masked path read, checked
against vLLM's own cache writer (``cpu_attn_reshape_and_cache``, "vec")."""

import pytest
import torch

from vllm_multiverse.vllm032.cpu.kv_layout import copy_vec_token_slots, gather_kv

BLOCKS, HEADS, BS, D = 6, 2, 32, 64  # the cache of one layer: [blocks, kv heads, block size, 2 * head dim]


def _write(kv, key, value, slots):
    from vllm import _custom_ops as ops

    # As CPUAttentionBackendImpl.forward views the layer's cache.
    key_cache, value_cache = kv.view(BLOCKS, HEADS, BS * 2, D).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, torch.tensor(slots, dtype=torch.long), "vec")


@pytest.fixture
def cache():
    torch.manual_seed(0)
    kv = torch.zeros(BLOCKS, HEADS, BS, 2 * D)
    n = 70
    key, value = torch.randn(n, HEADS, D), torch.randn(n, HEADS, D)
    table = [4, 1, 3]  # the request's blocks, out of order
    slots = [table[i // BS] * BS + i % BS for i in range(n)]
    _write(kv, key, value, slots)
    return kv, key, value, table, slots


def test_gather_reads_what_vllm_wrote(cache):
    kv, key, value, table, _ = cache
    k, v = gather_kv(kv, torch.tensor([table, table[::-1]]))
    n = len(key)
    assert torch.equal(k[0, :n], key) and torch.equal(v[0, :n], value)
    # A second row, its blocks in another order: the same tokens, moved.
    perm = [table.index(b) for b in table[::-1]]
    moved = torch.cat([torch.arange(p * BS, (p + 1) * BS) for p in perm])
    keep = moved < n
    assert torch.equal(k[1][keep], key[moved[keep]]) and torch.equal(v[1][keep], value[moved[keep]])


def test_token_copies_equal_vllm_writing_the_same_tokens_there(cache):
    kv, key, value, table, slots = cache
    # Tokens 10..49 to fresh slots in blocks 0, 2 and 5: what the merge does.
    dst = [
        b * BS + o
        for b, o in zip([0] * 20 + [2] * 12 + [5] * 8, list(range(12, 32)) + list(range(12)) + list(range(8)))
    ]
    want = kv.clone()
    _write(want, key[10:50], value[10:50], dst)
    copy_vec_token_slots([kv], list(zip(slots[10:50], dst)))
    assert torch.equal(kv, want)
