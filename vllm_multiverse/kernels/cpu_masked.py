"""The CPU masked-attention kernel (``csrc/cpu/masked_attention.cpp``):
built on first use with ``torch.utils.cpp_extension.load`` (g++ -O3 -mavx2
-mfma, cached by torch under ``TORCH_EXTENSIONS_DIR``, so a machine compiles
it once), or absent, and then the SDPA route runs instead.

Absent when: ``MULTIVERSE_CPU_KERNEL=0``, the CPU lacks AVX2, the source is
not there (a non-editable install ships no ``csrc/``), or the build fails
(one warning in the log).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import numpy as np
import torch

# Under vLLM's logger tree (its handlers), without importing vLLM here.
logger = logging.getLogger("vllm.plugins.vllm_multiverse.kernels.cpu_masked")

SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "cpu" / "masked_attention.cpp"


@functools.cache
def cpu_kernel():
    """``torch.ops.multiverse_cpu`` once the kernel is loaded, or None (the
    torch route runs)."""
    if os.environ.get("MULTIVERSE_CPU_KERNEL", "1") == "0":
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        logger.info("Multiverse CPU masked-attention kernel not used: the CPU has no AVX2")
        return None
    if not SOURCE.is_file():
        logger.info("Multiverse CPU masked-attention kernel not used: %s is not installed", SOURCE)
        return None
    try:
        from torch.utils.cpp_extension import load

        load(
            name="multiverse_cpu_masked_attention",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-mavx2", "-mfma"],
            is_python_module=False,  # the library registers its op with the dispatcher
            verbose=False,
        )
        return torch.ops.multiverse_cpu
    except Exception as e:  # noqa: BLE001  (any build failure: the torch route still works)
        logger.warning("Multiverse CPU masked-attention kernel failed to build (%s); using the SDPA route", e)
        return None


def kernel_supports(query: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """Whether the kernel takes this layer: float32, vLLM's "vec" block
    size (a multiple of 32), a head size in whole AVX2 vectors."""
    return (
        query.dtype == torch.float32
        and kv_cache.dtype == torch.float32
        and kv_cache.is_contiguous()
        and kv_cache.shape[2] % 32 == 0
        and query.shape[-1] % 8 == 0
    )


def row_rects(rects_per_row: list[tuple], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rect_indptr int32 [rows + 1], rects int32 [R, 4]) of each row's
    rectangles, in the kernel's form."""
    counts = np.fromiter((len(r) for r in rects_per_row), dtype=np.int32, count=len(rects_per_row))
    indptr = np.zeros(len(rects_per_row) + 1, dtype=np.int32)
    np.cumsum(counts, out=indptr[1:])
    flat = [x for rects in rects_per_row for rect in rects for x in rect]
    return torch.from_numpy(indptr), torch.tensor(flat, dtype=torch.int32).reshape(-1, 4)


def attend(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    output: torch.Tensor,
    q_offsets: torch.Tensor,
    q_lens: torch.Tensor,
    kv_lens: torch.Tensor,
    block_table: torch.Tensor,
    rects: tuple[torch.Tensor, torch.Tensor],
    scale: float,
) -> None:
    """Write each row's attention into ``output`` (``[tokens, heads * D]``
    or ``[tokens, heads, D]``): queries ``kv_len - q_len .. kv_len - 1`` at
    ``q_offset ..`` of the batch, over the row's blocks of vLLM's "vec" cache,
    causal but for the row's rectangles ``(rect_indptr, rects)``."""
    heads, d = query.shape[1], query.shape[2]
    i32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
    cpu_kernel().masked_attention(
        query,
        kv_cache,
        output.view(output.shape[0], heads, d),
        i32(q_offsets),
        i32(q_lens),
        i32(kv_lens),
        i32(block_table),
        i32(rects[0]),
        i32(rects[1]),
        scale,
    )
