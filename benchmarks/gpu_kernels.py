"""Timings of the CUDA ops of csrc/ on a GPU, against what they replace.

    python benchmarks/gpu_kernels.py [--reps 20] [--layers 64] [--pairs 2000]

- The merge's token-slot copy (``torch.ops.vllm_multiverse.copy_kv_slots``)
  on a realistic merge: 64 layers, 8 kv heads, head size 128, bf16, kernel
  blocks of 16, 2000 slots copied, vLLM's NHD order (LBNHC); against the
  torch fallback (``copy_token_slots_torch``, indexing per layer) and a
  plain device-to-device copy of the same bytes (``dst.copy_(src)`` on
  contiguous buffers, the bandwidth ceiling). GB/s count bytes read plus
  bytes written.
- The packed mask (``torch.ops.vllm_multiverse.pack_masks``) of one
  4000 x 4000 masked row with 50 rectangles, against ``pack_masks_torch``
  on the GPU; the end-to-end ``pack_masks`` (with the inputs' upload) too.

CUDA events, warm-up, then the median of ``--reps`` timed repetitions. No
vLLM needed. Exits 1 where there is no CUDA GPU or ``vllm_multiverse._C`` is
not built (what it times is the kernels).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from gpu_summary import record  # noqa: E402
from kernel_cases import cuda_ms  # noqa: E402

from vllm_multiverse.kernels import _ext  # noqa: E402
from vllm_multiverse.kernels.kv_copy import copy_token_slots, copy_token_slots_torch, slot_tensors  # noqa: E402
from vllm_multiverse.kernels.packed_mask import (  # noqa: E402
    MaskedRow,
    byte_indptr,
    pack_masks,
    pack_masks_torch,
    rect_tensors,
)


def row(name: str, us: float, nbytes: int | None = None, ref: float | None = None) -> str:
    gbps = f"{nbytes / us / 1e3:9.1f}" if nbytes else " " * 9
    rel = f"{us / ref:8.2f}x" if ref else " " * 9
    return f"  {name:<44} {us:10.1f} {gbps} {rel}"


def header(title: str) -> None:
    print(f"\n{title}")
    print(f"  {'':<44} {'µs':>10} {'GB/s':>9} {'vs first':>9}")


def bench_copy(args) -> None:
    dev = torch.device("cuda")
    L, H, D, n = args.layers, args.heads, args.head_size, args.block
    num_blocks = -(-2 * args.pairs // n) + 8
    # LBNHC: [L, B, N, H, C] contiguous; a layer's logical view [B, H, N, C].
    base = torch.randn(L, num_blocks, n, H, 2 * D, device=dev).to(torch.bfloat16)
    caches = [base[i].permute(0, 2, 1, 3) for i in range(L)]
    copies = [
        (int(s), int(d))
        for s, d in np.random.default_rng(0)
        .permutation(num_blocks * n)[: 2 * args.pairs]
        .reshape(2, -1)
        .T
    ]
    src, dst = slot_tensors(copies, dev)
    row_bytes = H * 2 * D * base.element_size()
    moved = 2 * args.pairs * L * row_bytes  # read + written
    flat_src = torch.empty(args.pairs * L * row_bytes, dtype=torch.uint8, device=dev)
    flat_dst = torch.empty_like(flat_src)

    header(
        f"token-slot copy: {L} layers x {args.pairs} slots, {H} kv heads x head {D}, bf16, "
        f"blocks of {n}, LBNHC ({moved / 1e6:.0f} MB moved)"
    )
    want = base.clone()
    copy_token_slots_torch([want[i].permute(0, 2, 1, 3) for i in range(L)], src, dst)
    _ext.ops().copy_kv_slots(caches, src, dst)
    torch.cuda.synchronize()
    assert torch.equal(base, want), "kernel and torch fallback disagree"
    results = [
        ("copy_kv_slots kernel", cuda_ms(lambda: _ext.ops().copy_kv_slots(caches, src, dst), args.reps) * 1e3),
        ("copy_token_slots (incl. slot upload)", cuda_ms(lambda: copy_token_slots(caches, copies), args.reps) * 1e3),
    ]
    results.append(
        (
            "torch fallback (copy_token_slots_torch)",
            cuda_ms(lambda: copy_token_slots_torch(caches, src, dst), args.reps) * 1e3,
        )
    )
    results.append(
        (
            "device-to-device copy of the same bytes",
            cuda_ms(lambda: flat_dst.copy_(flat_src), args.reps) * 1e3,
        )
    )
    ref = results[0][1]
    for name, us in results:
        print(row(name, us, moved, ref))
    record(
        f"copy_kv_slots: {L} layers x {args.pairs} slots, bf16, LBNHC",
        True,
        kernel_us=f"{ref:.1f}",
        GB_per_s=f"{moved / ref / 1e3:.0f}",
        torch_fallback_us=f"{results[2][1]:.1f}",
        device_copy_us=f"{results[3][1]:.1f}",
    )


def bench_mask(args) -> None:
    dev = torch.device("cuda")
    size = args.mask_len
    rng = np.random.default_rng(1)
    rects = []
    for _ in range(args.rects):
        q0, k0 = int(rng.integers(0, size)), int(rng.integers(0, size))
        rects.append(
            (
                q0,
                min(size, q0 + int(rng.integers(50, 800))),
                k0,
                min(size, k0 + int(rng.integers(50, 800))),
            )
        )
    rows = [MaskedRow(0, size, tuple(rects))]
    total = byte_indptr(rows)[-1]

    header(
        f"packed mask: one {size} x {size} masked row, {args.rects} rectangles ({total / 1e6:.1f} MB out)"
    )
    t = {k: v.to(dev) for k, v in rect_tensors(rows, "cpu").items()}
    inputs = [t[k] for k in ("starts", "q_lens", "byte_indptr", "rect_indptr", "rects")]
    got = _ext.ops().pack_masks(*inputs, total)
    assert torch.equal(got, pack_masks_torch(rows, dev)[0]), "kernel and pack_masks_torch disagree"
    results = [
        ("pack_masks kernel", cuda_ms(lambda: _ext.ops().pack_masks(*inputs, total), args.reps) * 1e3),
        ("pack_masks (incl. input upload)", cuda_ms(lambda: pack_masks(rows, dev), args.reps) * 1e3),
    ]
    results.append(
        ("pack_masks_torch on the GPU", cuda_ms(lambda: pack_masks_torch(rows, dev), args.reps) * 1e3)
    )
    ref = results[0][1]
    for name, us in results:
        print(row(name, us, total, ref))
    record(
        f"pack_masks: {size} x {size}, {args.rects} rectangles",
        True,
        kernel_us=f"{ref:.1f}",
        with_upload_us=f"{results[1][1]:.1f}",
        torch_us=f"{results[2][1]:.1f}",
    )


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--layers", type=int, default=64)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--block", type=int, default=16, help="kernel block size")
    p.add_argument("--pairs", type=int, default=2000, help="token slots copied")
    p.add_argument("--mask-len", type=int, default=4000)
    p.add_argument("--rects", type=int, default=50)
    args = p.parse_args()

    if not torch.cuda.is_available():
        print("gpu_kernels: needs a CUDA GPU", file=sys.stderr)
        return 1
    if not (_ext.has_op("copy_kv_slots") and _ext.has_op("pack_masks")):
        print(
            "gpu_kernels: vllm_multiverse._C is not built (pip install --no-build-isolation -e .)",
            file=sys.stderr,
        )
        return 1
    print(
        f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    )
    bench_copy(args)
    bench_mask(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
