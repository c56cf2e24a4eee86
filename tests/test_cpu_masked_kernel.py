"""The CPU masked-attention kernel (csrc/cpu/masked_attention.cpp) over
vLLM's "vec" cache, against float64 attention on contiguous K/V and against
the SDPA route (its spec): decode groups, whole prefills, chunked prefills,
rows ending inside Paths, nested blocks, GQA, causal rows mixed in, block
sizes over one chunk, a head size not a multiple of 32."""

import numpy as np
import pytest
import torch
from masked_cases import batch_of, masked_case, reference_attention, vec_cache

from vllm_multiverse.kernels import cpu_masked
from vllm_multiverse.kernels.masked_attention import sdpa_masked_rows
from vllm_multiverse.kernels.packed_mask import MaskedRow
from vllm_multiverse.vllm032.cpu.kv_layout import gather_kv

pytestmark = pytest.mark.skipif(cpu_masked.cpu_kernel() is None, reason="the CPU kernel did not build here")

def kernel_attend(batch, query, kv, output, scale):
    """The kernel over ``batch`` as the attention backend calls it for a
    step whose requests are the batch's rows, in order: each row's block
    table and its rectangles found by its first query."""
    q_lens = [r.q_len for r in batch.rows]
    qsl = np.zeros(len(q_lens) + 1, dtype=np.int32)
    np.cumsum(q_lens, out=qsl[1:])
    assert list(qsl[:-1]) == batch.offsets
    table = np.zeros((len(batch.rows), max(batch.num_pages(i) for i in range(len(batch.rows)))), dtype=np.int32)
    for i in range(len(batch.rows)):
        table[i, : batch.num_pages(i)] = batch.block_ids[i][: batch.num_pages(i)]
    t = torch.from_numpy(qsl)
    cpu_masked.attend(query, kv, output, t[:-1], t[1:] - t[:-1], torch.tensor([r.kv_len for r in batch.rows]),
                      torch.from_numpy(table), batch.request_rects(), scale)


SHAPES = {  # (rows, n_blocks, q_len, ends inside a Path) per part of the batch
    "decode": [(9, 2, 1, True)],
    "prefill": [(2, 3, None, False)],
    "chunked": [(3, 2, 37, False), (2, 2, 5, True)],
    "nested-mixed": [(3, 2, 1, True), (1, 4, None, False), (2, 3, 20, True)],
}


def _rows(rng, shape):
    rows, dense = [], []
    for n, blocks, q_len, in_path in SHAPES[shape]:
        r, m = masked_case(rng, n_rows=n, n_blocks=blocks, path_len=14, q_len=q_len, in_path=in_path)
        rows, dense = rows + r, dense + m
    return rows, dense


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("heads", [(2, 2), (4, 2), (8, 2)], ids=["mha", "gqa2", "gqa4"])
@pytest.mark.parametrize("block_size,head_size", [(32, 64), (128, 64), (64, 80)])
def test_kernel_equals_attention_under_the_mask(shape, heads, block_size, head_size):
    rng = np.random.default_rng(11)
    hq, hk = heads
    rows, dense = _rows(rng, shape)
    # The masks hide something in every case (the kernel skips, not only masks).
    assert any(not m.all() or m.shape[0] > 1 for m in dense)
    kv, block_ids, ks, vs = vec_cache(rng, rows, block_size, hk, head_size)
    batch = batch_of(rows, block_ids, block_size)
    total = sum(r.q_len for r in rows)
    query = torch.randn(total, hq, head_size)
    scale = head_size**-0.5
    got = torch.full((total, hq * head_size), float("nan"))
    kernel_attend(batch, query, kv, got, scale)
    spec = torch.full_like(got, float("nan"))
    # SDPA multiplies the padding it gathers by zero: NaN there would spread.
    sdpa_masked_rows(batch, query, kv.nan_to_num(0.0), spec, scale, gather_kv)
    for i, (a, row) in enumerate(zip(batch.offsets, rows)):
        want = reference_attention(query[a : a + row.q_len], ks[i], vs[i], dense[i], scale)
        out = got[a : a + row.q_len].view(row.q_len, hq, head_size)
        torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got, spec, atol=2e-5, rtol=2e-5)


def test_causal_rows_and_strided_views():
    """Rows with no rectangle are causal attention; query and output may be
    views with a token stride (vLLM's q slice of the fused qkv)."""
    rng = np.random.default_rng(5)
    hq, hk, d, bs = 4, 2, 64, 32
    rows = [MaskedRow(0, 70, ()), MaskedRow(90, 1, ()), MaskedRow(40, 33, ())]
    kv, block_ids, ks, vs = vec_cache(rng, rows, bs, hk, d)
    batch = batch_of(rows, block_ids, bs)
    total = sum(r.q_len for r in rows)
    qkv = torch.randn(total, (hq + 2 * hk) * d)
    query = qkv[:, : hq * d].view(total, hq, d)
    out = torch.zeros(total, 2 * hq * d)[:, : hq * d]
    kernel_attend(batch, query, kv, out, 0.125)
    for i, (a, row) in enumerate(zip(batch.offsets, rows)):
        causal = torch.ones(row.q_len, row.kv_len, dtype=torch.bool).tril(row.start)
        want = reference_attention(query[a : a + row.q_len], ks[i], vs[i], causal, 0.125)
        torch.testing.assert_close(
            out[a : a + row.q_len].reshape(row.q_len, hq, d).double(), want, atol=2e-5, rtol=2e-5
        )


def test_a_hidden_range_has_no_effect():
    """Keys a query may not see change nothing, however large (in contrast
    with the same keys visible)."""
    rng = np.random.default_rng(2)
    rows = [MaskedRow(199, 1, ((199, 200, 40, 150),)), MaskedRow(199, 1, ())]
    kv, block_ids, _, _ = vec_cache(rng, rows, 32, 1, 32)
    batch = batch_of(rows, block_ids, 32)
    query = torch.randn(2, 1, 32)
    before = torch.zeros(2, 32)
    kernel_attend(batch, query, kv, before, 1.0)
    for i in range(2):  # keys 40..149 of both rows blown up
        for t in range(40, 150):
            kv.view(kv.shape[0], 1, 2, 32, 32)[int(block_ids[i][t // 32]), 0, 0, :, t % 32] = 1e3
    after = torch.zeros(2, 32)
    kernel_attend(batch, query, kv, after, 1.0)
    assert torch.equal(before[0], after[0])
    assert not torch.allclose(before[1], after[1])


def _vllm_causal(query, kv, qsl, seq_lens, table, scale):
    from vllm import _custom_ops as ops

    nb, hk, bs, c = kv.shape
    key_cache, value_cache = kv.view(nb, hk, bs * 2, c // 2).chunk(2, dim=2)
    meta = ops.cpu_attn_get_scheduler_metadata(
        len(seq_lens), query.shape[1], hk, c // 2, seq_lens, torch.float32, qsl, True, -1, "vec", False
    )
    out = torch.zeros_like(query)
    ops.cpu_attention_with_kv_cache(
        query, key_cache, value_cache, out, qsl, seq_lens, scale, True, None, -1, table, 0.0, meta, None
    )
    return out


def test_causal_rows_equal_vllms_kernel_on_what_vllm_wrote():
    """The whole-step route: a step's unmasked rows through the kernel give
    vLLM's own CPU attention, over a cache vLLM's writer filled (decode rows,
    a chunked prefill and a full prefill, vLLM's block table)."""
    from vllm import _custom_ops as ops

    torch.manual_seed(0)
    hq, hk, d, bs, nb = 4, 2, 64, 32, 40
    kv = torch.zeros(nb, hk, bs, 2 * d)
    key_cache, value_cache = kv.view(nb, hk, bs * 2, d).chunk(2, dim=2)
    seq_lens = torch.tensor([150, 97, 61, 33], dtype=torch.int32)
    q_lens = torch.tensor([1, 1, 29, 33], dtype=torch.int32)
    perm = torch.randperm(nb).to(torch.int32)
    table = perm[: 4 * 6].view(4, 6).contiguous()
    for r in range(4):  # the whole sequence, as earlier steps and this one wrote it
        n = int(seq_lens[r])
        t = torch.arange(n)
        slots = table[r].long()[t // bs] * bs + t % bs
        ops.cpu_attn_reshape_and_cache(
            torch.randn(n, hk, d), torch.randn(n, hk, d), key_cache, value_cache, slots, "vec"
        )
    qsl = torch.zeros(5, dtype=torch.int32)
    qsl[1:] = q_lens.cumsum(0)
    query = torch.randn(int(qsl[-1]), hq, d)
    want = _vllm_causal(query, kv, qsl, seq_lens, table, 0.125)
    got = torch.zeros_like(query)
    no_rects = (torch.zeros(5, dtype=torch.int32), torch.zeros(0, 4, dtype=torch.int32))
    cpu_masked.attend(query, kv, got, qsl[:-1], q_lens, seq_lens, table, no_rects, 0.125)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
