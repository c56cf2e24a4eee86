"""Masked rows on CUDA, at Multiverse-32B's attention shape (40 query heads,
8 KV heads, head size 128, bf16, 16-token pages, NHD).

1. Per case: FlashInfer's paged prefill with the packed Multiverse mask,
   against the same prefill with no mask (FlashInfer's causal mode) and
   against the SDPA route; and the packed mask's build time (``_C`` kernel /
   torch).
2. What computing a step's masked rows once saves. One step: 16 decode rows
   of about 4k context with masks, 8 causal decode rows of 4k, one masked
   prefill chunk of 2k queries against 8k keys, timed
   (a) as the plugin runs it: FlashInfer's whole-step call, every row once;
   (b) as it ran before: a causal kernel for every row, then the masked rows
       gathered, recomputed by FlashInfer and scattered back. The causal
       kernel is torch's FlashAttention-2 (vLLM's FlashAttention is not
       installed on the GPU machine): one varlen call for all rows over
       K/V packed beforehand (as vLLM's one call, minus its paging), and, as
       the brief's per-row form, one flash SDPA call per row.
   Per layer (``run``), the per-step ``plan`` beside it, and a 64-layer step.

    python benchmarks/gpu_masked_prefill.py

Exits 1 where there is no CUDA GPU, FlashInfer does not import or
``vllm_multiverse._C`` is not built.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from gpu_summary import record  # noqa: E402
from kernel_cases import cuda_ms  # noqa: E402

HQ, HK, D, PAGE, DTYPE = 40, 8, 128, 16, torch.bfloat16
SCALE = D**-0.5
LAYERS = 64  # Multiverse-32B (Qwen2.5-32B)


def separate_prefill(layout: str):
    """A FlashInfer prefill with its own workspace: planned apart from the
    process's one (``flashinfer_prefill``), so both plans stay valid."""
    from vllm_multiverse.kernels.masked_attention import FLASHINFER_WORKSPACE_BYTES, FlashInferMaskedPrefill

    return FlashInferMaskedPrefill(torch.empty(FLASHINFER_WORKSPACE_BYTES, dtype=torch.uint8, device="cuda"), layout)


def cases() -> None:
    from masked_cases import batch_of, masked_case, paged_cache

    from vllm_multiverse.kernels.masked_attention import flashinfer_prefill, gather_logical, sdpa_masked_rows
    from vllm_multiverse.kernels.packed_mask import MaskedRow, pack_masks, pack_masks_torch

    print("case | rows x q_len / kv_len | masked ms | causal ms | ratio | sdpa ms | mask build ms (kernel / torch)")
    masked, causal = flashinfer_prefill(torch.device("cuda"), "NHD"), separate_prefill("NHD")
    for name, n_rows, n_blocks, path_len, q_len in [
        ("prompt with blocks", 1, 12, 120, None),
        ("recompute x4", 4, 8, 100, None),
        ("sequential decode x32", 32, 8, 100, 1),
        ("chunk of 512", 2, 16, 120, 512),
    ]:
        rng = np.random.default_rng(0)
        rows, _ = masked_case(rng, n_rows=n_rows, n_blocks=n_blocks, path_len=path_len, q_len=q_len)
        kv, block_ids, _, _ = paged_cache(rng, rows, PAGE, HK, D, DTYPE, "cuda", "NHD")
        batch = batch_of(rows, block_ids, PAGE)
        total = sum(r.q_len for r in rows)
        query = torch.randn(total, HQ, D, device="cuda", dtype=DTYPE)
        out = torch.empty(total, HQ * D, device="cuda", dtype=DTYPE)

        masked.plan(batch, HQ, HK, D, DTYPE, DTYPE, SCALE)
        t_masked = cuda_ms(lambda: masked.run(batch, query, kv, out))

        # The same prefill with no custom mask: FlashInfer's causal mode.
        plain = batch_of([MaskedRow(r.start, r.q_len, ()) for r in rows], block_ids, PAGE)
        q_ind = np.concatenate([[0], np.cumsum([r.q_len for r in rows])]).astype(np.int32)
        pages = [plain.num_pages(i) for i in range(len(rows))]
        kv_ind = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
        idx = np.concatenate([b[:p] for b, p in zip(block_ids, pages)]).astype(np.int32)
        last = np.array([r.kv_len - (p - 1) * PAGE for r, p in zip(rows, pages)], dtype=np.int32)
        causal.wrapper.plan(
            torch.from_numpy(q_ind), torch.from_numpy(kv_ind), torch.from_numpy(idx).cuda(), torch.from_numpy(last),
            HQ, HK, D, PAGE, causal=True, sm_scale=SCALE, q_data_type=DTYPE, kv_data_type=DTYPE,
        )  # fmt: skip
        t_causal = cuda_ms(lambda: causal.run(plain, query, kv, out))

        t_sdpa = cuda_ms(lambda: sdpa_masked_rows(batch, query, kv, out, SCALE, gather_logical), reps=3)
        t_pack = cuda_ms(lambda: pack_masks(rows, "cuda"))
        t_pack_torch = cuda_ms(lambda: pack_masks_torch(rows, "cuda"), reps=3)
        shape = f"{n_rows} x {rows[0].q_len} / {rows[0].kv_len}"
        print(
            f"{name} | {shape} | {t_masked:.3f} | {t_causal:.3f} | {t_masked / t_causal:.2f} | {t_sdpa:.2f} | "
            f"{t_pack:.3f} / {t_pack_torch:.2f}"
        )
        record(
            f"masked prefill, {name} ({shape})",
            True,
            masked_ms=f"{t_masked:.3f}",
            causal_ms=f"{t_causal:.3f}",
            ratio=f"{t_masked / t_causal:.2f}",
            sdpa_ms=f"{t_sdpa:.2f}",
        )


def step_rows(rng):
    """(rows in the step's order, indices of the masked ones): decodes
    first, as vLLM orders a batch, then the prefill chunk."""
    from masked_cases import structured_row

    from vllm_multiverse.kernels.packed_mask import MaskedRow

    masked_decodes = [structured_row(rng, int(rng.integers(3800, 4300)), 1, path_len=300)[0] for _ in range(16)]
    causal_decodes = [MaskedRow(4095, 1, ()) for _ in range(8)]
    chunk = structured_row(rng, 8192, 2048, path_len=500)[0]
    rows = masked_decodes + causal_decodes + [chunk]
    return rows, list(range(16)) + [len(rows) - 1]


def whole_step() -> bool:
    from masked_cases import batch_of, paged_cache
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    from vllm_multiverse.kernels.masked_attention import MaskedBatch, flashinfer_prefill

    rng = np.random.default_rng(3)
    rows, masked = step_rows(rng)
    kv, block_ids, ks, vs = paged_cache(rng, rows, PAGE, HK, D, DTYPE, "cuda", "NHD")
    step = batch_of(rows, block_ids, PAGE)
    total = sum(r.q_len for r in rows)
    query = torch.randn(total, HQ, D, device="cuda", dtype=DTYPE)
    out = torch.empty(total, HQ * D, device="cuda", dtype=DTYPE)

    # (a) the whole step in one FlashInfer call.
    fi_all = flashinfer_prefill(torch.device("cuda"), "NHD")
    plan_a = cuda_ms(lambda: fi_all.plan(step, HQ, HK, D, DTYPE, DTYPE, SCALE), reps=5)
    run_a = cuda_ms(lambda: fi_all.run(step, query, kv, out))
    want = out.clone()

    # (b) causal for every row, then the masked rows again.
    only = MaskedBatch(
        [rows[i] for i in masked],
        list(np.cumsum([0] + [rows[i].q_len for i in masked[:-1]])),
        [block_ids[i] for i in masked],
        PAGE,
    )
    queries = [np.arange(step.offsets[i], step.offsets[i] + rows[i].q_len) for i in masked]
    index = torch.from_numpy(np.concatenate(queries))
    index = index.cuda()
    fi_masked = separate_prefill("NHD")
    plan_b = cuda_ms(lambda: fi_masked.plan(only, HQ, HK, D, DTYPE, DTYPE, SCALE), reps=5)
    masked_out = torch.empty(len(index), HQ * D, device="cuda", dtype=DTYPE)

    def recompute_masked():
        fi_masked.run(only, query.index_select(0, index), kv, masked_out)
        out.index_copy_(0, index, masked_out)

    keys, values = torch.cat(ks).contiguous(), torch.cat(vs).contiguous()
    cu_q = torch.tensor(np.cumsum([0] + [r.q_len for r in rows]), dtype=torch.int32, device="cuda")
    cu_k = torch.tensor(np.cumsum([0] + [r.kv_len for r in rows]), dtype=torch.int32, device="cuda")
    max_q, max_k = max(r.q_len for r in rows), max(r.kv_len for r in rows)

    def causal_varlen():
        # FlashAttention-2's varlen forward: causal aligned bottom-right.
        o = torch.ops.aten._flash_attention_forward(
            query, keys, values, cu_q, cu_k, max_q, max_k, 0.0, True, False, scale=SCALE
        )[0]
        out.copy_(o.view(total, HQ * D))

    per_row = [
        (
            query[a : a + r.q_len].transpose(0, 1)[None],
            k.transpose(0, 1)[None].contiguous(),
            v.transpose(0, 1)[None].contiguous(),
            causal_lower_right(r.q_len, r.kv_len),
            slice(a, a + r.q_len),
        )
        for a, r, k, v in zip(step.offsets, rows, ks, vs)
    ]

    def causal_per_row():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            for q, k, v, bias, at in per_row:
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=SCALE, enable_gqa=True)
                out[at] = o[0].transpose(0, 1).reshape(-1, HQ * D)

    # The stand-ins compute what FlashInfer computes for the causal rows,
    # and (b) as a whole what (a) does.
    causal = [i for i in range(len(rows)) if i not in masked]
    causal_idx = torch.cat([torch.arange(step.offsets[i], step.offsets[i] + rows[i].q_len) for i in causal]).cuda()
    ok = True
    for causal_kernel in (causal_varlen, causal_per_row):
        out.zero_()
        causal_kernel()
        ok &= torch.allclose(out[causal_idx].float(), want[causal_idx].float(), atol=2e-2, rtol=2e-2)
        recompute_masked()
        ok &= torch.allclose(out.float(), want.float(), atol=2e-2, rtol=2e-2)
    run_masked = cuda_ms(recompute_masked)
    run_varlen = cuda_ms(causal_varlen)
    run_rows = cuda_ms(causal_per_row)

    def per_step(plan, run):
        return plan + LAYERS * run

    a = per_step(plan_a, run_a)
    b_varlen = per_step(plan_b, run_varlen + run_masked)
    b_rows = per_step(plan_b, run_rows + run_masked)
    print(f"\none step: {len(rows)} rows, {total} queries ({len(masked)} masked rows); ms")
    print("route | plan | run per layer | step of 64 layers | vs (a)")
    print(f"(a) FlashInfer, whole step | {plan_a:.3f} | {run_a:.3f} | {a:.2f} | 1.00")
    print(
        f"(b) varlen flash + FlashInfer masked | {plan_b:.3f} | {run_varlen:.3f} + {run_masked:.3f} | "
        f"{b_varlen:.2f} | {b_varlen / a:.2f}"
    )
    print(
        f"(b) flash SDPA per row + FlashInfer masked | {plan_b:.3f} | {run_rows:.3f} + {run_masked:.3f} | "
        f"{b_rows:.2f} | {b_rows / a:.2f}"
    )
    record(
        "one step, masked rows once (a) vs causal + recompute (b)",
        ok,
        a_run_ms=f"{run_a:.3f}",
        b_run_ms=f"{run_varlen:.3f} + {run_masked:.3f} (varlen) / {run_rows:.3f} + {run_masked:.3f} (per row)",
        plan_ms=f"{plan_a:.2f} / {plan_b:.2f}",
        b_over_a_64_layers=f"{b_varlen / a:.2f} (varlen) / {b_rows / a:.2f} (per row)",
        same_outputs=ok,
    )
    return ok


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_masked_prefill: needs a CUDA GPU", file=sys.stderr)
        return 1
    try:
        import flashinfer
    except ImportError as e:
        print(f"gpu_masked_prefill: cannot import flashinfer ({e}); scripts/gpu_wheels.sh", file=sys.stderr)
        return 1
    from vllm_multiverse.kernels._ext import has_op

    if not has_op("pack_masks"):
        print("gpu_masked_prefill: vllm_multiverse._C is not built (its mask kernel is timed)", file=sys.stderr)
        return 1
    print(f"{torch.cuda.get_device_name()}; flashinfer {flashinfer.__version__}")
    t0 = time.perf_counter()
    cases()
    ok = whole_step()
    print(f"\n{time.perf_counter() - t0:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
