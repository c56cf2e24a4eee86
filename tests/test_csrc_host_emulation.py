"""The kernels' own code run on the CPU: csrc/*.cu built with
-DMULTIVERSE_HOST_EMULATION into a shared library whose host functions run
each kernel's per-block / per-byte code (``__host__ __device__``) over host
memory, with the launcher's plan (the unit of vectorization, the strides in
units). Checked against the torch versions; what this cannot see is the
launch itself (grid, block size) and the device's memory system."""

from __future__ import annotations

import ctypes
import functools
import subprocess

import numpy as np
import pytest
import torch
from kernel_cases import (
    CSRC,
    ORDERS,
    STRIDED_CONTENT,
    find_nvcc,
    layer_views,
    layered_caches,
    random_copies,
    random_rows,
)

from vllm_multiverse.kernels.kv_copy import copy_token_slots_torch, slot_tensors
from vllm_multiverse.kernels.packed_mask import (
    MaskedRow,
    byte_indptr,
    pack_masks_torch,
    rect_tensors,
)

NVCC = find_nvcc()
pytestmark = pytest.mark.skipif(
    NVCC is None, reason="nvcc not found (set CUDA_HOME or put it on PATH)"
)

i64, u64, ptr = ctypes.c_int64, ctypes.c_uint64, ctypes.c_void_p


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    out = tmp_path_factory.mktemp("csrc-emulation") / "libmultiverse_host.so"
    cmd = [NVCC, "-shared", "-Xcompiler", "-fPIC", "-std=c++17", "-O2", "-DMULTIVERSE_HOST_EMULATION",
           "-gencode", "arch=compute_80,code=sm_80", "kv_copy.cu", "packed_mask.cu", "-o", str(out)]  # fmt: skip
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=CSRC, timeout=300)
    assert result.returncode == 0, result.stderr
    lib = ctypes.CDLL(str(out))
    lib.multiverse_host_copy_kv_slots.restype = i64
    lib.multiverse_host_copy_kv_slots.argtypes = [ptr, i64, u64, ptr, i64, ptr, i64] + [i64] * 10
    lib.multiverse_host_pack_masks.restype = ctypes.c_int
    lib.multiverse_host_pack_masks.argtypes = [ptr] * 5 + [i64, ptr, i64]
    return lib


def emulate_copy(lib, caches, src, dst) -> list[int]:
    """As torch_bindings.cpp does: layers grouped by shape, strides and
    element size, one 'launch' per group. Returns each group's unit."""
    groups: dict = {}
    for kv in caches:
        groups.setdefault((tuple(kv.shape), kv.stride(), kv.element_size()), []).append(kv)
    units = []
    for (shape, strides, esize), layers in groups.items():
        table = (i64 * len(layers))(*[kv.data_ptr() for kv in layers])
        ptr_or = functools.reduce(lambda a, b: a | b, [kv.data_ptr() for kv in layers])
        unit = lib.multiverse_host_copy_kv_slots(
            ctypes.cast(table, ptr), len(layers), ptr_or,
            src.data_ptr(), src.stride(0), dst.data_ptr(), dst.stride(0), src.numel(),
            *shape, esize, *strides,
        )  # fmt: skip
        assert unit > 0
        units.append(unit)
    return units


def _copy_case(
    lib, order, dtype, heads, head_size, n, element_offset=0, layers=3, blocks=6, seed=0
):
    base, caches = layered_caches(
        order, layers, blocks, heads, n, 2 * head_size, dtype, seed, element_offset=element_offset
    )
    want_base = base.clone()
    want = layer_views(want_base, order)
    copies = random_copies(np.random.default_rng(seed), blocks * n, 2 * n + 3)
    src, dst = slot_tensors(copies, torch.device("cpu"))  # strided views of one [P, 2] tensor
    assert src.stride(0) == 2
    copy_token_slots_torch(want, src, dst)
    units = emulate_copy(lib, caches, src, dst)
    assert torch.equal(base, want_base)
    return units


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.uint8, torch.float64], ids=str
)
@pytest.mark.parametrize("n", [16, 32])
@pytest.mark.parametrize("order", ORDERS)
def test_copy_kernel_code_is_the_torch_copy(lib, order, n, dtype):
    units = _copy_case(lib, order, dtype, heads=2, head_size=8, n=n)
    assert units == [16]  # rows of 16 * element size bytes, all aligned


@pytest.mark.parametrize(
    "order,dtype,head_size,element_offset,unit",
    [
        ("LBNHC", torch.bfloat16, 128, 0, 16),
        ("LBHNC", torch.bfloat16, 72, 0, 16),
        ("BLHNC", torch.float16, 80, 0, 16),
        ("LBHNC", torch.bfloat16, 6, 0, 8),  # 24-byte rows
        ("LBHNC", torch.float16, 3, 0, 4),  # 12-byte rows
        ("LBHNC", torch.uint8, 3, 0, 2),  # 6-byte rows
        ("LBHNC", torch.uint8, 1, 0, 2),
        ("LBHNC", torch.float32, 8, 1, 4),  # addresses 4 bytes off
        ("LBNHC", torch.bfloat16, 8, 3, 2),
        ("LBNHC", torch.uint8, 64, 5, 1),
        (STRIDED_CONTENT, torch.bfloat16, 8, 0, 2),  # element path, content strided
        (STRIDED_CONTENT, torch.uint8, 5, 0, 1),
    ],
)
def test_copy_kernel_code_vectorizes_only_where_aligned(
    lib, order, dtype, head_size, element_offset, unit
):
    for n in (16, 32):
        assert _copy_case(lib, order, dtype, 4, head_size, n, element_offset) == [unit]


def test_copy_kernel_code_groups_mixed_layers(lib):
    """Layers of different dtypes and orders in one call: one launch each."""
    _, a = layered_caches("LBNHC", 2, 4, 2, 16, 16, torch.bfloat16, seed=1)
    _, b = layered_caches("BLHNC", 2, 4, 2, 16, 16, torch.float32, seed=2)
    caches = [a[0], b[0], a[1], b[1]]
    want = [kv.clone() for kv in caches]
    copies = random_copies(np.random.default_rng(4), 64, 20)
    src, dst = slot_tensors(copies, torch.device("cpu"))
    copy_token_slots_torch(want, src, dst)
    assert len(emulate_copy(lib, caches, src, dst)) == 2
    assert all(torch.equal(kv, w) for kv, w in zip(caches, want))


def test_copy_kernel_code_stops_at_a_slot_out_of_range(lib):
    """A slot outside the cache is a bookkeeping bug: the kernel traps
    (the emulation returns -2) instead of skipping the pair."""
    _, caches = layered_caches("LBNHC", 1, 2, 2, 16, 16, torch.float32)
    for src, dst in (([5, 32], [40, 3]), ([7, -1], [9, 4]), ([7, 3], [9, 32])):
        kv = caches[0]
        table = (i64 * 1)(kv.data_ptr())
        s, d = torch.tensor(src), torch.tensor(dst)
        unit = lib.multiverse_host_copy_kv_slots(
            ctypes.cast(table, ptr), 1, kv.data_ptr(), s.data_ptr(), 1, d.data_ptr(), 1, 2,
            *kv.shape, kv.element_size(), *kv.stride(),
        )  # fmt: skip
        assert unit == -2, (src, dst)


def emulate_pack(lib, rows, total=None) -> torch.Tensor:
    t = {k: v.contiguous() for k, v in rect_tensors(rows, "cpu").items()}
    total = byte_indptr(rows)[-1] if total is None else total
    out = torch.full((total,), 0xAB, dtype=torch.uint8)
    rc = lib.multiverse_host_pack_masks(
        *[t[k].data_ptr() for k in ("starts", "q_lens", "byte_indptr", "rect_indptr", "rects")],
        len(rows), out.data_ptr(), total,
    )  # fmt: skip
    assert rc == 0
    return out


@pytest.mark.parametrize("seed", range(30))
def test_mask_kernel_code_is_pack_masks_torch(lib, seed):
    rng = np.random.default_rng(seed)
    rows = random_rows(rng, int(rng.integers(1, 6)), max_start=60, max_q=40, max_rects=8)
    assert torch.equal(emulate_pack(lib, rows), pack_masks_torch(rows)[0])


@pytest.mark.parametrize(
    "rows",
    [
        [MaskedRow(0, 1, ())],
        [
            MaskedRow(0, 3, ((1, 3, 0, 1),)),
            MaskedRow(0, 2, ()),
            MaskedRow(1, 1, ()),
        ],  # bytes span rows
        [MaskedRow(3, 0, ()), MaskedRow(2, 5, ((3, 6, 1, 4),)), MaskedRow(4, 0, ())],  # empty rows
        [MaskedRow(10, 6, ((0, 100, 0, 100),))],
        [
            MaskedRow(
                4000,
                2000,
                tuple(
                    (q, q + 37, k, k + 300)
                    for q, k in zip(range(4000, 6000, 40), range(0, 6000, 120))
                ),
            )
        ],
    ],
    ids=["one-bit", "short-kv", "empty-rows", "all-hidden", "long"],
)
def test_mask_kernel_code_edge_rows(lib, rows):
    assert torch.equal(emulate_pack(lib, rows), pack_masks_torch(rows)[0])


def test_mask_kernel_code_zeroes_bytes_past_the_rows(lib):
    rows = [MaskedRow(1, 3, ())]
    out = emulate_pack(lib, rows, total=byte_indptr(rows)[-1] + 5)
    assert torch.equal(out[:-5], pack_masks_torch(rows)[0]) and not out[-5:].any()
