"""The masked rows' attention routes on CPU tensors (no vLLM): the packed
mask against the structure rule's dense mask, and the SDPA route over a paged
cache in each physical order against float64 attention on contiguous K/V."""

import numpy as np
import pytest
import torch

from masked_cases import LAYOUTS, batch_of, masked_case, paged_cache, reference_attention
from vllm_multiverse.kernels.masked_attention import flashinfer_layout, flashinfer_paged_kv, gather_logical, sdpa_masked_rows
from vllm_multiverse.kernels.packed_mask import pack_masks


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
    assert batch.query_index("cpu").tolist() == list(range(total))
    if shape == "decode":
        groups = batch.decode_groups(400, "cpu")
        assert len(groups) > 1 and max(len(g.queries) for g in groups) > 1
