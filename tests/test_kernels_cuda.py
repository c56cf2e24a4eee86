"""The CUDA kernels of csrc/ (vllm_multiverse._C) against the torch versions
on a GPU. No vLLM import: the GPU machine has none (scripts/gpu_check.sh)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import vllm_views
from kernel_cases import (
    ORDERS,
    STRIDED_CONTENT,
    layer_views,
    layered_caches,
    random_copies,
    random_rows,
)
from vendor.kv_cache_layout import KVCacheLayout

from vllm_multiverse.kernels import _ext
from vllm_multiverse.kernels.kv_copy import copy_token_slots, copy_token_slots_torch, slot_tensors
from vllm_multiverse.kernels.packed_mask import (
    MaskedRow,
    pack_masks,
    pack_masks_torch,
    rect_tensors,
)


def _compiled_ops() -> str | None:
    """Why the kernels cannot be tested here, or None."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import vllm_multiverse._C  # noqa: F401
    except ImportError as e:
        return f"vllm_multiverse._C not built ({e}); pip install --no-build-isolation -e ."
    return None


_WHY_NOT = _compiled_ops()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(_WHY_NOT is not None, reason=_WHY_NOT or "")]

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _ops():
    return torch.ops.vllm_multiverse


def _copy_case(
    order,
    dtype,
    head_size,
    n,
    *,
    heads=4,
    layers=3,
    blocks=12,
    pairs=None,
    seed=0,
    element_offset=0,
):
    """(kernel result, torch result) on one set of caches."""
    base, caches = layered_caches(
        order, layers, blocks, heads, n, 2 * head_size, dtype, seed, "cuda", element_offset
    )
    want_base = base.clone()
    want = layer_views(want_base, order)
    copies = random_copies(np.random.default_rng(seed), blocks * n, pairs or 3 * n + 5)
    src, dst = slot_tensors(copies, base.device)
    _ops().copy_kv_slots(caches, src, dst)
    copy_token_slots_torch(want, src, dst)
    torch.cuda.synchronize()
    return base, want_base


def test_ops_are_registered():
    assert _ext.has_op("copy_kv_slots") and _ext.has_op("pack_masks")


@pytest.mark.parametrize("head_size", [72, 80, 128])
@pytest.mark.parametrize("n", [16, 32])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("order", ORDERS)
def test_copy_kernel_is_the_torch_copy(order, dtype, n, head_size):
    got, want = _copy_case(order, dtype, head_size, n)
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    "order,dtype,head_size,element_offset",
    [
        ("LBHNC", torch.bfloat16, 6, 0),  # 8-byte units
        ("LBHNC", torch.float16, 3, 0),  # 4-byte units
        ("LBHNC", torch.uint8, 3, 0),  # 2-byte units
        ("LBNHC", torch.uint8, 64, 0),
        ("LBHNC", torch.float32, 8, 1),  # addresses off 16 bytes
        ("LBNHC", torch.bfloat16, 128, 3),
        ("LBNHC", torch.uint8, 64, 5),
        (STRIDED_CONTENT, torch.bfloat16, 8, 0),  # element copies
        (STRIDED_CONTENT, torch.uint8, 5, 0),
    ],
)
def test_copy_kernel_unaligned_and_strided(order, dtype, head_size, element_offset):
    for n in (16, 32):
        got, want = _copy_case(order, dtype, head_size, n, element_offset=element_offset)
        assert torch.equal(got, want)


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="no float8 in this torch")
def test_copy_kernel_fp8():
    """fp8 caches (1-byte elements), the reference on their bytes."""
    order, n = "LBHNC", 16
    base, caches = layered_caches(order, 3, 12, 4, n, 256, torch.float8_e4m3fn, device="cuda")
    want_base = base.view(torch.uint8).clone()
    copies = random_copies(np.random.default_rng(0), 12 * n, 3 * n)
    src, dst = slot_tensors(copies, base.device)
    _ops().copy_kv_slots(caches, src, dst)
    copy_token_slots_torch(layer_views(want_base, order), src, dst)
    torch.cuda.synchronize()
    assert torch.equal(base.view(torch.uint8), want_base)


def test_copy_kernel_many_layers_and_pairs():
    got, want = _copy_case(
        "LBNHC", torch.bfloat16, 128, 16, heads=8, layers=32, blocks=260, pairs=2000
    )
    assert torch.equal(got, want)


def test_copy_token_slots_uses_the_kernel_and_groups_layers():
    _, a = layered_caches("LBNHC", 2, 8, 2, 16, 32, torch.bfloat16, seed=1, device="cuda")
    _, b = layered_caches("BHLNC", 2, 8, 2, 16, 32, torch.float32, seed=2, device="cuda")
    caches = [a[0], b[0], a[1], a[0], b[1]]  # mixed groups, a[0] twice
    want = [kv.clone() for kv in (a[0], b[0], a[1], b[1])]
    copies = random_copies(np.random.default_rng(3), 8 * 16, 50)
    src, dst = slot_tensors(copies, torch.device("cuda"))
    copy_token_slots_torch(want, src, dst)
    copy_token_slots(caches, copies)
    torch.cuda.synchronize()
    assert all(torch.equal(kv, w) for kv, w in zip((a[0], b[0], a[1], b[1]), want))


@pytest.mark.parametrize("layout,kernel_block", [("LBNHC", 16), ("LBHNC", 16), ("BLNHC", 64)])
def test_copy_kernel_on_vllm_views(layout, kernel_block):
    """The views a vLLM 0.32 worker hands the backends (one int8 buffer,
    ``as_strided`` per layer: tests/vllm_views.py), 64-token scheduler blocks
    split into kernel blocks where vLLM splits them, a Multiverse-32B layer
    shape: the kernel writes exactly the bytes the torch copy writes."""
    made = [
        vllm_views.kv_cache_views(KVCacheLayout[layout], 4, 40, 64, kernel_block, 8, 128, torch.bfloat16, "cuda")
        for _ in range(2)
    ]
    (raw, views), (want_raw, want) = made
    gen = torch.Generator(device="cuda").manual_seed(0)
    raw.copy_(torch.randint(-128, 128, raw.shape, dtype=torch.int8, device="cuda", generator=gen))
    want_raw.copy_(raw)
    copies = random_copies(np.random.default_rng(1), 40 * 64, 600)
    copy_token_slots(views, copies)
    copy_token_slots_torch(want, *slot_tensors(copies, raw.device))
    torch.cuda.synchronize()
    assert torch.equal(raw, want_raw)


def test_copy_kernel_checks_its_arguments():
    _, caches = layered_caches("LBNHC", 1, 2, 2, 16, 16, torch.float32, device="cuda")
    src = torch.tensor([0, 1], device="cuda")
    with pytest.raises(RuntimeError, match="int64"):
        _ops().copy_kv_slots(caches, src.int(), src)
    with pytest.raises(RuntimeError, match="1-D"):
        _ops().copy_kv_slots(caches, src, src[:1])
    with pytest.raises(RuntimeError):
        _ops().copy_kv_slots(caches, src.cpu(), src.cpu())
    _ops().copy_kv_slots(caches, src[:0], src[:0])  # nothing to do


def _check_pack(rows):
    packed, indptr = pack_masks(rows, "cuda")
    want, want_indptr = pack_masks_torch(rows, "cpu")
    assert packed.is_cuda and packed.dtype == torch.uint8
    assert torch.equal(indptr.cpu(), want_indptr)
    assert torch.equal(packed.cpu(), want)


@pytest.mark.parametrize("seed", range(20))
def test_pack_masks_kernel_is_pack_masks_torch(seed):
    rng = np.random.default_rng(seed)
    _check_pack(random_rows(rng, int(rng.integers(1, 9)), max_start=300, max_q=200, max_rects=20))


def test_pack_masks_kernel_short_and_empty_rows():
    _check_pack(
        [
            MaskedRow(0, 1, ()),
            MaskedRow(3, 0, ()),
            MaskedRow(0, 3, ((1, 3, 0, 1),)),
            MaskedRow(2, 2, ()),
        ]
    )


def test_pack_masks_kernel_long_rows():
    rng = np.random.default_rng(5)
    long = MaskedRow(
        4000,
        2000,
        tuple(
            (q, q + int(rng.integers(1, 200)), k, k + int(rng.integers(1, 900)))
            for q, k in zip(range(4000, 6000, 10), rng.integers(0, 6000, 200))
        ),
    )
    _check_pack([long, *random_rows(rng, 3, 500, 100, 10), long])


def test_pack_masks_kernel_checks_its_arguments():
    rows = [MaskedRow(2, 3, ((2, 4, 0, 1),))]
    t = {k: v.cuda() for k, v in rect_tensors(rows).items()}
    args = [t[k] for k in ("starts", "q_lens", "byte_indptr", "rect_indptr", "rects")]
    assert _ops().pack_masks(*args, 0).numel() == 0
    with pytest.raises(RuntimeError, match="int32"):
        _ops().pack_masks(args[0].long(), *args[1:], 2)
    with pytest.raises(RuntimeError, match="byte_indptr"):
        _ops().pack_masks(args[0], args[1], args[2][:1], *args[3:], 2)
