"""Cases and independent references for the ops of vllm_multiverse/kernels
(the merge's token-slot copy, the packed mask), shared by the CPU, host
emulation and CUDA tests. No vLLM and no hypothesis: the GPU machine runs
test_kernels_cuda.py without either."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch

from vllm_multiverse.kernels.packed_mask import MaskedRow

CSRC = Path(__file__).resolve().parents[1] / "csrc"


def find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


# vLLM's physical orders of the KV caches of all layers, as letters of one
# contiguous tensor: L layers, B (kernel) blocks, N tokens of a block, H kv
# heads, C = 2 * head_size (K then V). A layer's logical view is
# [B, H, N, C] whatever the order; where L is not first, it is a slice of
# the one tensor and its block (or head) stride spans the layers.
ORDERS = ("LBNHC", "LBHNC", "BLNHC", "BLHNC", "BHLNC", "LHBNC")
# Not a vLLM order: the content axis strided, for the kernel's element path.
STRIDED_CONTENT = "LBHCN"
LOGICAL = "BHNC"


def random_fill(shape, dtype, seed: int, device="cpu") -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen, device=device).to(dtype)
    return torch.randint(0, 256, shape, generator=gen, device=device, dtype=torch.int64).to(dtype)


def layered_caches(
    order: str,
    num_layers: int,
    num_blocks: int,
    heads: int,
    n: int,
    content: int,
    dtype: torch.dtype,
    seed: int = 0,
    device="cpu",
    element_offset: int = 0,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(the one physical tensor, each layer's logical [B, H, N, C] view).

    ``element_offset`` starts the tensor that many elements into its storage
    (addresses not 16-byte aligned)."""
    sizes = dict(L=num_layers, B=num_blocks, N=n, H=heads, C=content)
    shape = [sizes[c] for c in order]
    numel = int(np.prod(shape))
    flat = random_fill((numel + element_offset,), dtype, seed, device)
    base = flat[element_offset:].view(shape)
    return base, layer_views(base, order)


def layer_views(base: torch.Tensor, order: str) -> list[torch.Tensor]:
    logical = base.permute(*[order.index(c) for c in "L" + LOGICAL])
    return [logical[i] for i in range(logical.shape[0])]


def random_copies(rng: np.random.Generator, num_slots: int, count: int) -> list[tuple[int, int]]:
    """``count`` (src, dst) slot pairs, sources and destinations disjoint,
    destinations distinct."""
    perm = rng.permutation(num_slots)[: 2 * count]
    return [(int(s), int(d)) for s, d in zip(perm[:count], perm[count:])]


def reference_copy(
    caches: list[torch.Tensor], copies: list[tuple[int, int]], sched_block: int
) -> list[torch.Tensor]:
    """What each cache must hold after the copy: a clone, token by token, the
    slot mapped through the scheduler's block (``sched_block`` tokens, each
    ``sched_block // n`` kernel blocks of ``n``)."""
    out = []
    for kv in caches:
        n = kv.shape[2]
        per = sched_block // n
        want = kv.clone()
        for s, d in copies:
            sb, so = divmod(s, sched_block)
            db, do = divmod(d, sched_block)
            want[db * per + do // n, :, do % n, :] = kv[sb * per + so // n, :, so % n, :]
        out.append(want)
    return out


def dense_mask(row: MaskedRow) -> np.ndarray:
    """Boolean [q_len, kv_len], straight from the rule: query token q =
    start + r may see key k iff k <= q and (q, k) is in no rectangle."""
    kv_len = row.start + row.q_len
    q = row.start + np.arange(row.q_len)[:, None]
    k = np.arange(kv_len)[None, :]
    allowed = k <= q
    for q0, q1, k0, k1 in row.rects:
        allowed &= ~((q0 <= q) & (q < q1) & (k0 <= k) & (k < k1))
    return allowed


def packed_reference(rows: list[MaskedRow]) -> tuple[np.ndarray, list[int]]:
    """(packed uint8, byte indptr): each row's dense mask through
    ``np.packbits`` (little bit order), the rows concatenated."""
    parts = [np.packbits(dense_mask(r).reshape(-1), bitorder="little") for r in rows]
    indptr = [0]
    for p in parts:
        indptr.append(indptr[-1] + len(p))
    packed = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    return packed.astype(np.uint8), indptr


def random_rows(
    rng: np.random.Generator, num_rows: int, max_start: int, max_q: int, max_rects: int
) -> list[MaskedRow]:
    rows = []
    for _ in range(num_rows):
        start = int(rng.integers(0, max_start + 1))
        q_len = int(rng.integers(1, max_q + 1))
        kv_len = start + q_len
        rects = []
        for _ in range(int(rng.integers(0, max_rects + 1))):
            q0, q1 = sorted(int(x) for x in rng.integers(0, kv_len + 2, 2))
            k0, k1 = sorted(int(x) for x in rng.integers(0, kv_len + 2, 2))
            rects.append((q0, q1, k0, k1))
        rows.append(MaskedRow(start, q_len, tuple(rects)))
    return rows


def cpu_peak_bytes(fn) -> int:
    """Most bytes CPU tensors held at once while ``fn()`` ran, beyond what
    was held before: the profiler's allocation events, summed in order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cpu = torch.autograd.DeviceType.CPU
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == cpu]
    held = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        held += e.nbytes()
        peak = max(peak, held)
    return peak


def cuda_ms(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` on the current CUDA stream, after
    ``warmup`` calls (the GPU tests and benchmarks time with it)."""
    import statistics

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
