"""Masked rows on CUDA: FlashInfer's paged prefill with the packed Multiverse
mask, against the same prefill with no mask (causal) and against the SDPA
debugging route; and the packed mask's build time. Qwen2.5-32B's attention
shape (40 query heads, 8 KV heads, head size 128), bf16, 16-token pages.

    python benchmarks/gpu_masked_prefill.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def timed(fn, reps: int = 20) -> float:
    """Mean milliseconds of ``fn`` on the GPU after three warm-ups."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to time")
        return 0
    from masked_cases import batch_of, masked_case, paged_cache

    from vllm_multiverse.kernels._ext import has_op
    from vllm_multiverse.kernels.masked_attention import FlashInferMaskedPrefill, gather_logical, sdpa_masked_rows
    from vllm_multiverse.kernels.packed_mask import pack_masks, pack_masks_torch

    hq, hk, d, page, dtype = 40, 8, 128, 16, torch.bfloat16
    scale = d**-0.5
    print(f"{torch.cuda.get_device_name()}; csrc built: {has_op('pack_masks')}")
    print("case | rows x q_len / kv_len | masked ms | causal ms | ratio | sdpa ms | mask build ms (kernel / torch)")
    for name, n_rows, n_blocks, path_len, q_len in [
        ("prompt with blocks", 1, 12, 120, None),
        ("recompute x4", 4, 8, 100, None),
        ("sequential decode x32", 32, 8, 100, 1),
        ("chunk of 512", 2, 16, 120, 512),
    ]:
        rng = np.random.default_rng(0)
        rows, _ = masked_case(rng, n_rows=n_rows, n_blocks=n_blocks, path_len=path_len, q_len=q_len)
        kv, block_ids, _, _ = paged_cache(rng, rows, page, hk, d, dtype, "cuda", "NHD")
        batch = batch_of(rows, block_ids, page)
        total = sum(r.q_len for r in rows)
        query = torch.randn(total, hq, d, device="cuda", dtype=dtype)
        out = torch.empty(total, hq * d, device="cuda", dtype=dtype)

        masked = FlashInferMaskedPrefill("cuda", "NHD")
        masked.plan(batch, hq, hk, d, dtype, dtype, scale)
        t_masked = timed(lambda: masked.run(batch, query, kv, out))

        causal = FlashInferMaskedPrefill("cuda", "NHD")
        plain = [type(r)(r.start, r.q_len, ()) for r in rows]
        plain_batch = batch_of(plain, block_ids, page)
        # The same prefill with no custom mask: FlashInfer's causal mode.
        q_ind = np.concatenate([[0], np.cumsum([r.q_len for r in rows])]).astype(np.int32)
        pages = [plain_batch.num_pages(i) for i in range(len(rows))]
        kv_ind = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
        idx = np.concatenate([b[:p] for b, p in zip(block_ids, pages)]).astype(np.int32)
        last = np.array([r.kv_len - (p - 1) * page for r, p in zip(rows, pages)], dtype=np.int32)
        causal.wrapper.plan(
            torch.from_numpy(q_ind), torch.from_numpy(kv_ind), torch.from_numpy(idx).cuda(), torch.from_numpy(last),
            hq, hk, d, page, causal=True, sm_scale=scale, q_data_type=dtype, kv_data_type=dtype,
        )
        t_causal = timed(lambda: causal.run(plain_batch, query, kv, out))

        t_sdpa = timed(lambda: sdpa_masked_rows(batch, query, kv, out, scale, gather_logical), reps=3)
        t_pack = timed(lambda: pack_masks(rows, "cuda"))
        t_pack_torch = timed(lambda: pack_masks_torch(rows, "cuda"), reps=3)
        shape = f"{n_rows} x {rows[0].q_len} / {rows[0].kv_len}"
        print(
            f"{name} | {shape} | {t_masked:.3f} | {t_causal:.3f} | {t_masked / t_causal:.2f} | {t_sdpa:.2f} | "
            f"{t_pack:.3f} / {t_pack_torch:.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
