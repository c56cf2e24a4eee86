"""The masked rows' attention routes on CPU tensors (no vLLM): the packed
mask against the structure rule's dense mask, and the SDPA route over a paged
cache in each physical order against float64 attention on contiguous K/V."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from kernel_cases import cpu_peak_bytes
from masked_cases import LAYOUTS, batch_of, masked_case, paged_cache, reference_attention

from vllm_multiverse.kernels.masked_attention import (
    flashinfer_layout,
    flashinfer_paged_kv,
    gather_logical,
    sdpa_masked_rows,
    sdpa_peak_bytes,
)
from vllm_multiverse.kernels.packed_mask import MaskedRow, pack_masks


@pytest.mark.parametrize("q_len", [None, 1, 37])
def test_packed_mask_is_the_structure_rules_dense_mask(q_len):
    rng = np.random.default_rng(7)
    rows, dense = masked_case(rng, n_rows=3, n_blocks=3, path_len=12, q_len=q_len)
    packed, indptr = pack_masks(rows, "cpu")
    packed, indptr = packed.numpy(), indptr.tolist()
    for i, (row, want) in enumerate(zip(rows, dense)):
        bits = np.unpackbits(packed[indptr[i] : indptr[i + 1]], bitorder="little")
        got = bits[: row.q_len * row.kv_len].reshape(row.q_len, row.kv_len).astype(bool)
        assert (got == want.numpy()).all()
        assert not bits[row.q_len * row.kv_len :].any()
    if q_len is None:  # whole sequences: the mask hides more than causal does
        assert all((~d).sum() > (~torch.ones_like(d).tril()).sum() for d in dense)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("page_size", [16, 32])
@pytest.mark.parametrize("shape", ["prefill", "decode", "mixed"])
def test_sdpa_route_over_a_paged_cache(layout, heads, page_size, shape, monkeypatch):
    """Rows of one query (sequential decoding) go batched, in groups of at
    most GROUP_BYTES of gathered K/V (small here: several groups)."""
    import vllm_multiverse.kernels.masked_attention as ma

    monkeypatch.setattr(ma, "GROUP_BYTES", 400 * 2 * heads[1] * 16 * 4)  # 400 tokens
    rng = np.random.default_rng(3)
    hq, hk, d = *heads, 16
    rows, dense = [], []
    for n, q_len in {"prefill": [(3, 29)], "decode": [(7, 1)], "mixed": [(2, 1), (1, 29), (3, 1)]}[shape]:
        r, m = masked_case(rng, n_rows=n, n_blocks=2, path_len=10, q_len=q_len, in_path=q_len == 1)
        rows, dense = rows + r, dense + m
    assert all(not m.all() for r, m in zip(rows, dense) if r.q_len == 1)
    kv, block_ids, ks, vs = paged_cache(rng, rows, page_size, hk, d, torch.float32, "cpu", layout)
    assert flashinfer_layout(kv) == layout
    k, v = flashinfer_paged_kv(kv, layout)
    assert k.shape[1:] == ((page_size, hk, d) if layout == "NHD" else (hk, page_size, d))
    batch = batch_of(rows, block_ids, page_size)
    total = sum(r.q_len for r in rows)
    query = torch.randn(total, hq, d)
    output = torch.zeros(total, hq * d)
    scale = d**-0.5
    sdpa_masked_rows(batch, query, kv, output, scale, gather_logical)
    for i, (a, row) in enumerate(zip(batch.offsets, rows)):
        want = reference_attention(query[a : a + row.q_len], ks[i], vs[i], dense[i], scale)
        got = output[a : a + row.q_len].view(row.q_len, hq, d)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    if shape == "decode":
        groups = batch.decode_groups(400, "cpu")
        assert len(groups) > 1 and max(len(g.queries) for g in groups) > 1


def _long_row_case(rng, q_len, heads, d=16, page_size=16):
    rows, dense = masked_case(rng, n_rows=1, n_blocks=4, path_len=40, q_len=q_len)
    kv, block_ids, ks, vs = paged_cache(rng, rows, page_size, heads[1], d, torch.float32, "cpu", "NHD")
    batch = batch_of(rows, block_ids, page_size)
    query = torch.randn(rows[0].q_len, heads[0], d)
    return batch, kv, query, ks[0], vs[0], dense[0]


def test_sdpa_route_tiles_long_rows(monkeypatch):
    """A long row goes in tiles of queries (here about 7), each tile's query
    heads grouped per KV head: the same attention as one call."""
    import vllm_multiverse.kernels.masked_attention as ma

    hq, hk, d = 8, 2, 16
    batch, kv, query, k, v, allowed = _long_row_case(np.random.default_rng(5), None, (hq, hk), d)
    row = batch.rows[0]
    monkeypatch.setattr(ma, "TILE_BYTES", 7 * (hq // hk) * row.kv_len * ma._MASK_BYTES_PER_ELEMENT)
    assert ma.sdpa_tile_queries(row.kv_len, hq // hk) == 7 and row.q_len > 20
    out = torch.zeros(row.q_len, hq * d)
    sdpa_masked_rows(batch, query, kv, out, d**-0.5, gather_logical)
    want = reference_attention(query, k, v, allowed, d**-0.5)
    torch.testing.assert_close(out.view(row.q_len, hq, d).double(), want, atol=1e-5, rtol=1e-5)


def test_sdpa_route_never_passes_a_mask_with_enable_gqa(monkeypatch):
    """A mask together with ``enable_gqa`` leaves PyTorch on CUDA only its
    math kernel (float32 scores for every head: 40 GiB for an 8k x 32k row
    of Multiverse-32B); every call here is one the memory-efficient kernel
    takes, its mask within a tile's budget."""
    import vllm_multiverse.kernels.masked_attention as ma

    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((q.shape, k.shape, attn_mask.numel() if attn_mask is not None else 0, kw.get("enable_gqa", False)))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(ma.F, "scaled_dot_product_attention", spy)
    rng = np.random.default_rng(9)
    hq, hk, d = 8, 2, 16
    rows, _ = masked_case(rng, n_rows=2, n_blocks=2, path_len=10, q_len=1, in_path=True)
    more, _ = masked_case(rng, n_rows=1, n_blocks=3, path_len=30, q_len=None)
    rows += more
    kv, block_ids, _, _ = paged_cache(rng, rows, 16, hk, d, torch.float32, "cpu", "HND")
    batch = batch_of(rows, block_ids, 16)
    total = sum(r.q_len for r in rows)
    sdpa_masked_rows(batch, torch.randn(total, hq, d), kv, torch.zeros(total, hq * d), d**-0.5, gather_logical)
    assert len(calls) == 2  # one decode group, one long row
    for q_shape, k_shape, mask_elements, gqa in calls:
        assert not gqa and q_shape[1] == k_shape[1] == hk
        assert mask_elements * ma._MASK_BYTES_PER_ELEMENT <= ma.TILE_BYTES


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_sdpa_route_peak_is_within_its_bound(layout):
    """What the route holds at once for a long row (2k queries against 8k
    keys), measured, within ``sdpa_peak_bytes`` (what the runner reserves
    before vLLM sizes the KV cache), which stays below the scores the math
    kernel would make."""
    hq, hk, d, page = 8, 2, 64, 16
    row = MaskedRow(8192 - 2048, 2048, ((6500, 7000, 100, 3000), (7100, 8192, 2000, 6000)))
    rng = np.random.default_rng(1)
    kv, block_ids, _, _ = paged_cache(rng, [row], page, hk, d, torch.float32, "cpu", layout)
    batch = batch_of([row], block_ids, page)
    query, out = torch.randn(row.q_len, hq, d), torch.zeros(row.q_len, hq * d)
    peak = cpu_peak_bytes(lambda: sdpa_masked_rows(batch, query, kv, out, d**-0.5, gather_logical))
    bound = sdpa_peak_bytes(row.q_len, row.kv_len, hq, hk, d, torch.float32, page)
    scores = hq * row.q_len * row.kv_len * 4
    assert peak <= bound < scores / 2, (peak, bound, scores)
