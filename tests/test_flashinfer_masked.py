"""FlashInfer's masked paged prefill (the CUDA route for steps with masked
rows: every request of the step in one call) and the SDPA route (the masked
rows only) against float64 attention with the structure rule's dense mask,
at Multiverse-32B's attention shapes: head size 128, bf16, 40 query / 8 KV
heads (TP 1) and 10 / 2 (TP 4), vLLM's NHD and HND cache orders, pages of
16, 32 and 64 tokens. bf16 only: every case then runs one FlashInfer module
(fp16 would be a second nvcc build of minutes). GPU only; no vLLM needed.

The long rows (2k, 4k and 8k queries against 32k keys) record their times
and peak memory for scripts/gpu_check.sh's summary."""

import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from kernel_cases import cuda_ms
from masked_cases import (
    batch_of,
    masked_case,
    mixed_case,
    paged_cache,
    reference_attention,
    reference_attention_tiled,
    step_inputs,
    structured_row,
)

from vllm_multiverse.kernels.masked_attention import (
    flashinfer_layout,
    flashinfer_prefill,
    gather_logical,
    masked_scratch_bytes,
    sdpa_masked_rows,
)
from vllm_multiverse.kernels.packed_mask import MaskedRow

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from gpu_summary import record  # noqa: E402

pytestmark = pytest.mark.cuda

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("flashinfer")

D, DTYPE = 128, torch.bfloat16
TOL = dict(atol=2e-2, rtol=2e-2)
HEADS = {"tp1": (40, 8), "tp4": (10, 2)}


def _flashinfer(batch, query, kv, hq, hk, layout):
    fi = flashinfer_prefill(torch.device("cuda"), layout)
    fi.plan(batch, hq, hk, D, DTYPE, DTYPE, D**-0.5)
    out = torch.zeros(query.shape[0], hq * D, device="cuda", dtype=DTYPE)
    fi.run(batch, query, kv, out)
    return out


def _check_rows(out, batch, query, ks, vs, dense, rows):
    hq = query.shape[1]
    for i in rows:
        a, row = batch.offsets[i], batch.rows[i]
        want = reference_attention(query[a : a + row.q_len], ks[i], vs[i], dense[i], D**-0.5).float()
        torch.testing.assert_close(out[a : a + row.q_len].view(row.q_len, hq, D).float(), want, **TOL)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("n_rows,q_len", [(1, None), (3, None), (4, 1), (3, 300)])
def test_flashinfer_masked_prefill(layout, n_rows, q_len):
    rng = np.random.default_rng(11 + n_rows)
    hq, hk, page = 40, 8, 16
    rows, dense = masked_case(rng, n_rows=n_rows, n_blocks=4, path_len=60, q_len=q_len)
    kv, block_ids, ks, vs = paged_cache(rng, rows, page, hk, D, DTYPE, "cuda", layout)
    assert flashinfer_layout(kv) == layout
    batch = batch_of(rows, block_ids, page)
    query = torch.randn(sum(r.q_len for r in rows), hq, D, device="cuda", dtype=DTYPE)
    out = _flashinfer(batch, query, kv, hq, hk, layout)
    sdpa = torch.zeros_like(out)
    sdpa_masked_rows(batch, query, kv, sdpa, D**-0.5, gather_logical)
    _check_rows(out, batch, query, ks, vs, dense, range(len(rows)))
    _check_rows(sdpa, batch, query, ks, vs, dense, range(len(rows)))


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("page", [16, 32, 64])
@pytest.mark.parametrize("tp", HEADS)
def test_whole_step_mixes_causal_and_masked_rows(tp, page, layout):
    """FlashInfer computes every row of the step (causal ones with no
    rectangles); SDPA overwrites the masked rows only."""
    hq, hk = HEADS[tp]
    rng = np.random.default_rng(page + hq)
    rows, dense, masked = mixed_case(rng, n_masked=2, n_causal=5)
    kv, block_ids, ks, vs = paged_cache(rng, rows, page, hk, D, DTYPE, "cuda", layout)
    batch = batch_of(rows, block_ids, page)
    batch.masked = masked
    query = torch.randn(sum(r.q_len for r in rows), hq, D, device="cuda", dtype=DTYPE)
    out = _flashinfer(batch, query, kv, hq, hk, layout)
    _check_rows(out, batch, query, ks, vs, dense, range(len(rows)))
    sdpa = torch.zeros_like(out)
    sdpa_masked_rows(batch, query, kv, sdpa, D**-0.5, gather_logical)
    _check_rows(sdpa, batch, query, ks, vs, dense, masked)
    causal = [i for i in range(len(rows)) if i not in masked]
    assert all(not sdpa[batch.offsets[i] : batch.offsets[i] + rows[i].q_len].any() for i in causal)


KV_LONG = 32768


@pytest.fixture(scope="module")
def long_sequence():
    """A 32k-token structured sequence (its last 8k tokens run through
    Parallel blocks) and the structure rule's dense mask of those 8k rows."""
    row, s = structured_row(np.random.default_rng(7), KV_LONG, 8192, path_len=1000)
    return row.rects, torch.from_numpy(s.dense_mask()[KV_LONG - 8192 :].copy())


@pytest.mark.parametrize(
    "q_len,tp,layout,page",
    [(2048, "tp1", "NHD", 16), (4096, "tp1", "NHD", 16), (8192, "tp1", "NHD", 16), (8192, "tp4", "HND", 64)],
)
def test_long_row(long_sequence, q_len, tp, layout, page):
    """One row of ``q_len`` queries against 32k keys: its plan, its run, the
    memory they take beyond the inputs (within what the worker reserves for
    the route, ``masked_scratch_bytes``), against float64 computed in tiles."""
    rects, dense_tail = long_sequence
    hq, hk = HEADS[tp]
    rng = np.random.default_rng(q_len)
    rows = [MaskedRow(KV_LONG - q_len, q_len, rects)]
    batch, query, out, kv, ks, vs = step_inputs(rng, rows, page, hq, hk, D, DTYPE, "cuda", layout)
    fi = flashinfer_prefill(torch.device("cuda"), layout)  # its workspace is start-up memory
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    fi.plan(batch, hq, hk, D, DTYPE, DTYPE, D**-0.5)
    fi.run(batch, query, kv, out)
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base
    allowance = masked_scratch_bytes("flashinfer", q_len, KV_LONG, hq, hk, D, DTYPE, page)
    run_ms = cuda_ms(lambda: fi.run(batch, query, kv, out), 3, warmup=0)
    plan_ms = cuda_ms(lambda: fi.plan(batch, hq, hk, D, DTYPE, DTYPE, D**-0.5), 3, warmup=0)
    want = reference_attention_tiled(query, ks[0], vs[0], dense_tail[8192 - q_len :], D**-0.5)
    got = out.view(q_len, hq, D).float()
    record(
        f"FlashInfer long row {q_len} x {KV_LONG}, {hq}/{hk} heads, {layout}, page {page}",
        torch.allclose(got, want, **TOL) and peak <= allowance,
        run_ms=f"{run_ms:.2f}",
        plan_ms=f"{plan_ms:.2f}",
        first_plan_and_run_ms=f"{first * 1e3:.1f}",
        peak_MiB=f"{peak / 2**20:.0f}",
        allowance_MiB=f"{allowance / 2**20:.0f}",
        max_err=f"{(got - want).abs().max().item():.3g}",
    )
    torch.testing.assert_close(got, want, **TOL)
    assert peak <= allowance
