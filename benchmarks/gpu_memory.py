"""Peak GPU memory of the masked routes on one long row (a Multiverse-32B
layer: 40 query heads, 8 KV heads, head size 128, bf16; 16-token pages;
a 32k-token structured sequence whose last 8k tokens run through Parallel
blocks). Each figure is ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``, less what was allocated before (the inputs).

- The SDPA route (``sdpa_masked_rows``: query heads grouped per KV head,
  queries in tiles) on 2k, 4k and 8k queries against 32k keys, and on 16
  (where the gathered K/V is most of it), in vLLM's NHD order and for 16
  and 8k queries in HND, against the package's bound ``sdpa_peak_bytes``; its
  8k NHD result against float64 attention (computed in tiles) with the
  structure rule's dense mask.
- For contrast, the call it replaced, ``scaled_dot_product_attention(q, k, v,
  attn_mask=mask, enable_gqa=True)``, at 1k queries only; and that PyTorch's
  memory-efficient kernel refuses a mask with ``enable_gqa`` but runs the
  grouped form.
- The packed mask of the 8k x 32k row: ``pack_masks_torch`` (chunked) against
  the dense boolean mask's size and the package's allowance for it
  (``masked_scratch_bytes``: packed bytes plus ``PACK_TRANSIENT_BYTES``), and the
  ``_C`` kernel's bytes (``pack_masks``) against it and numpy's packbits.

    python benchmarks/gpu_memory.py

Exits 1 when a check fails or where there is no CUDA GPU.
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

HQ, HK, D, PAGE, DTYPE = 40, 8, 128, 16, torch.bfloat16
KV = 32768
MiB = 2**20


def measured(fn):
    """(fn's result, peak bytes beyond those allocated before, seconds)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() - base, time.perf_counter() - t0


def check_sdpa(rects, dense_tail) -> bool:
    from masked_cases import reference_attention_tiled, step_inputs

    from vllm_multiverse.kernels.masked_attention import gather_logical, sdpa_masked_rows, sdpa_peak_bytes
    from vllm_multiverse.kernels.packed_mask import MaskedRow

    ok_all = True
    for q_len, layout in [(16, "NHD"), (2048, "NHD"), (4096, "NHD"), (8192, "NHD"), (16, "HND"), (8192, "HND")]:
        rng = np.random.default_rng(q_len)
        rows = [MaskedRow(KV - q_len, q_len, rects)]
        batch, query, out, kv, ks, vs = step_inputs(rng, rows, PAGE, HQ, HK, D, DTYPE, "cuda", layout)
        reference = (q_len, layout) == (8192, "NHD")
        if not reference:
            del ks, vs  # not part of what the route holds
        _, peak, seconds = measured(lambda: sdpa_masked_rows(batch, query, kv, out, D**-0.5, gather_logical))
        bound = sdpa_peak_bytes(q_len, KV, HQ, HK, D, DTYPE, PAGE)
        ok = peak <= bound
        record(
            f"SDPA route {q_len} x {KV}, {layout}: peak <= sdpa_peak_bytes",
            ok,
            peak_MiB=f"{peak / MiB:.0f}",
            bound_MiB=f"{bound / MiB:.0f}",
            ms=f"{seconds * 1e3:.0f}",
        )
        ok_all &= ok
        if reference:
            want = reference_attention_tiled(query, ks[0], vs[0], dense_tail, D**-0.5)
            got = out.view(q_len, HQ, D).float()
            ok = torch.allclose(got, want, atol=2e-2, rtol=2e-2)
            record(f"SDPA route {q_len} x {KV} vs float64", ok, max_err=f"{(got - want).abs().max().item():.3g}")
            ok_all &= ok
    return ok_all


def check_old_call(rects, dense_tail) -> bool:
    """The call the SDPA route made before it grouped heads, at 1k queries."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q_len = 1024
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(HQ, q_len, D, device="cuda", dtype=DTYPE, generator=gen)
    k = torch.randn(HK, KV, D, device="cuda", dtype=DTYPE, generator=gen)
    v = torch.randn(HK, KV, D, device="cuda", dtype=DTYPE, generator=gen)
    mask = dense_tail[-q_len:].cuda()
    old = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # noqa: E731
    want, peak, seconds = measured(old)
    record(
        f"old call: mask + enable_gqa, {q_len} x {KV}", True, peak_MiB=f"{peak / MiB:.0f}", ms=f"{seconds * 1e3:.0f}"
    )
    group = HQ // HK
    # Query heads of one KV head as more queries of it (as _heads_grouped).
    grouped_q = q.view(HK, group, q_len, D).transpose(1, 2).reshape(1, HK, q_len * group, D)
    grouped_mask = mask.repeat_interleave(group, dim=0)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        try:
            old()
            refused = False
        except RuntimeError:
            refused = True
        grouped = lambda: F.scaled_dot_product_attention(grouped_q, k[None], v[None], attn_mask=grouped_mask)  # noqa: E731
        got, peak, seconds = measured(grouped)
    got = got.view(HK, q_len, group, D).transpose(1, 2).reshape(HQ, q_len, D)
    same = torch.allclose(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    record(
        "EFFICIENT_ATTENTION refuses mask + enable_gqa, runs the grouped form",
        refused and same,
        refused=refused,
        grouped_equals_old=same,
        grouped_peak_MiB=f"{peak / MiB:.0f}",
        ms=f"{seconds * 1e3:.0f}",
    )
    return refused and same


def check_packed_mask(rects, dense_tail) -> bool:
    from vllm_multiverse.kernels import _ext
    from vllm_multiverse.kernels.packed_mask import PACK_TRANSIENT_BYTES, MaskedRow, pack_masks, pack_masks_torch

    rows = [MaskedRow(KV - 8192, 8192, rects)]
    (packed, _), peak, seconds = measured(lambda: pack_masks_torch(rows, "cuda"))
    dense = 8192 * KV
    allowance = rows[0].num_bytes + PACK_TRANSIENT_BYTES  # what masked_scratch_bytes reserves for it
    ok = peak <= allowance < dense
    record(
        f"pack_masks_torch 8192 x {KV}: peak <= its allowance < dense bool mask",
        ok,
        peak_MiB=f"{peak / MiB:.2f}",
        allowance_MiB=f"{allowance / MiB:.2f}",
        dense_bool_MiB=f"{dense / MiB:.0f}",
        ms=f"{seconds * 1e3:.0f}",
    )
    if not _ext.has_op("pack_masks"):
        record("pack_masks through _C", False, why="vllm_multiverse._C not built")
        return False
    (kernel, _), peak_c, seconds_c = measured(lambda: pack_masks(rows, "cuda"))
    want = torch.from_numpy(np.packbits(dense_tail.numpy().reshape(-1), bitorder="little"))
    same = torch.equal(kernel, packed) and torch.equal(kernel.cpu(), want)
    record(
        "pack_masks through _C == pack_masks_torch == np.packbits of the dense mask",
        same,
        peak_MiB=f"{peak_c / MiB:.0f}",
        ms=f"{seconds_c * 1e3:.1f}",
    )
    return ok and same


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_memory: needs a CUDA GPU", file=sys.stderr)
        return 1
    from masked_cases import structured_row

    row, s = structured_row(np.random.default_rng(7), KV, 8192, path_len=1000)
    dense_tail = torch.from_numpy(s.dense_mask()[KV - 8192 :].copy())
    print(f"{torch.cuda.get_device_name()}; {len(row.rects)} hidden rectangles")
    results = [check(row.rects, dense_tail) for check in (check_sdpa, check_old_call, check_packed_mask)]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
