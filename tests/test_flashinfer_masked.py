"""FlashInfer's masked paged prefill (the CUDA route for masked rows) against
float64 attention with the structure rule's dense mask, on random bf16/fp16
data in vLLM's NHD and HND cache orders. GPU only; no vLLM needed."""

import numpy as np
import pytest
import torch

from masked_cases import batch_of, masked_case, paged_cache, reference_attention
from vllm_multiverse.kernels.masked_attention import FlashInferMaskedPrefill, flashinfer_layout, gather_logical, sdpa_masked_rows

pytestmark = pytest.mark.cuda

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
flashinfer = pytest.importorskip("flashinfer")


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("n_rows,q_len", [(1, None), (3, None), (4, 1), (3, 300)])
def test_flashinfer_masked_prefill(layout, dtype, n_rows, q_len):
    rng = np.random.default_rng(11 + n_rows)
    hq, hk, d, page = 40, 8, 128, 16  # Qwen2.5-32B's attention shape
    rows, dense = masked_case(rng, n_rows=n_rows, n_blocks=4, path_len=60, q_len=q_len)
    kv, block_ids, ks, vs = paged_cache(rng, rows, page, hk, d, dtype, "cuda", layout)
    assert flashinfer_layout(kv) == layout
    batch = batch_of(rows, block_ids, page)
    total = sum(r.q_len for r in rows)
    query = torch.randn(total, hq, d, device="cuda", dtype=dtype)
    scale = d**-0.5
    fi = FlashInferMaskedPrefill("cuda", layout)
    fi.plan(batch, hq, hk, d, dtype, dtype, scale)
    out = torch.zeros(total, hq * d, device="cuda", dtype=dtype)
    fi.run(batch, query, kv, out)
    sdpa = torch.zeros_like(out)
    sdpa_masked_rows(batch, query, kv, sdpa, scale, gather_logical)
    for i, (a, row) in enumerate(zip(batch.offsets, rows)):
        want = reference_attention(query[a : a + row.q_len], ks[i], vs[i], dense[i], scale).float()
        got = out[a : a + row.q_len].view(row.q_len, hq, d).float()
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(sdpa[a : a + row.q_len].view(row.q_len, hq, d).float(), want, atol=2e-2, rtol=2e-2)
