"""The pure-torch ops of vllm_multiverse/kernels (what the CUDA kernels of
csrc/ must match) against independent references: the merge's token-slot
copy in every vLLM physical order, and the packed mask against
``np.packbits`` of the rule's dense mask."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel_cases import (
    ORDERS,
    dense_mask,
    layered_caches,
    packed_reference,
    random_copies,
    reference_copy,
)
from vllm_multiverse.kernels import kv_copy
from vllm_multiverse.kernels.kv_copy import (
    copy_token_slots,
    copy_token_slots_torch,
    slot_tensors,
    unique_caches,
)
from vllm_multiverse.kernels.packed_mask import (
    MaskedRow,
    pack_masks,
    pack_masks_torch,
    rect_tensors,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.uint8]
# (kernel block size n, scheduler block size): each scheduler block is
# sched // n kernel blocks.
BLOCKS = [(16, 32), (16, 64), (32, 32), (32, 64)]
LAYERS, SCHED_BLOCKS, HEADS, HEAD_SIZE = 3, 4, 2, 8


def _case(order, n, sched, dtype, seed=0):
    num_kernel_blocks = SCHED_BLOCKS * sched // n
    base, caches = layered_caches(
        order, LAYERS, num_kernel_blocks, HEADS, n, 2 * HEAD_SIZE, dtype, seed
    )
    copies = random_copies(np.random.default_rng(seed), SCHED_BLOCKS * sched, 40)
    return base, caches, copies


def _check(caches, before, want, copies, sched):
    dst = {d for _, d in copies}
    for kv, b, w in zip(caches, before, want):
        assert torch.equal(kv, w)
        # Every slot but the destinations kept its content.
        n, per = kv.shape[2], sched // kv.shape[2]
        kept = torch.tensor([s for s in range(kv.shape[0] * n) if s not in dst])
        kb, ko = (kept // sched) * per + (kept % sched) // n, kept % n
        assert torch.equal(kv[kb, :, ko], b[kb, :, ko])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,sched", BLOCKS)
@pytest.mark.parametrize("order", ORDERS)
def test_copy_token_slots_torch_is_the_per_token_copy(order, n, sched, dtype):
    _, caches, copies = _case(order, n, sched, dtype)
    before = [kv.clone() for kv in caches]
    want = reference_copy(caches, copies, sched)
    src, dst = slot_tensors(copies, torch.device("cpu"))
    copy_token_slots_torch(caches, src, dst)
    _check(caches, before, want, copies, sched)
    assert not all(torch.equal(kv, b) for kv, b in zip(caches, before))  # the copy did something


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,sched", BLOCKS)
@pytest.mark.parametrize("order", ORDERS)
def test_copy_token_slots_on_cpu(order, n, sched, dtype):
    _, caches, copies = _case(order, n, sched, dtype, seed=1)
    before = [kv.clone() for kv in caches]
    want = reference_copy(caches, copies, sched)
    copy_token_slots(caches, copies)
    _check(caches, before, want, copies, sched)


@pytest.mark.parametrize("order", ORDERS)
def test_layers_sharing_a_cache_are_copied_once(order, monkeypatch):
    _, caches, copies = _case(order, 16, 32, torch.float32, seed=2)
    shared = [caches[0], caches[1], caches[0], caches[2], caches[1], caches[2][:]]
    assert [id(c) for c in unique_caches(shared)] == [id(caches[0]), id(caches[1]), id(caches[2])]
    seen = []
    real = kv_copy.copy_token_slots_torch
    monkeypatch.setattr(
        kv_copy, "copy_token_slots_torch", lambda cs, s, d: (seen.append(len(cs)), real(cs, s, d))
    )
    before = [kv.clone() for kv in caches]
    want = reference_copy(caches, copies, 32)
    copy_token_slots(shared, copies)
    assert seen == [3]
    _check(caches, before, want, copies, 32)


def test_copy_token_slots_of_nothing_is_a_no_op():
    base, caches, copies = _case("LBNHC", 16, 32, torch.float32)
    before = base.clone()
    copy_token_slots(caches, [])
    copy_token_slots([], copies)
    assert torch.equal(base, before)


def _check_packed(rows):
    packed, indptr = pack_masks_torch(rows)
    want, want_indptr = packed_reference(rows)
    assert packed.dtype == torch.uint8 and indptr.dtype == torch.int32
    assert indptr.tolist() == want_indptr
    assert np.array_equal(packed.numpy(), want)
    assert want_indptr[-1] == sum(r.num_bytes for r in rows)


_rect = st.tuples(*[st.integers(0, 80)] * 4)
_row = st.builds(
    lambda start, q_len, rects: MaskedRow(start, q_len, tuple(rects)),
    st.integers(0, 50),
    st.integers(1, 30),
    st.lists(_rect, max_size=6),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_row, max_size=5))
def test_pack_masks_torch_is_packbits_of_the_dense_rule(rows):
    _check_packed(rows)


@pytest.mark.parametrize(
    "row",
    [
        MaskedRow(0, 1, ()),  # one bit
        MaskedRow(0, 3, ((1, 3, 0, 1),)),  # kv_len < 8: a byte spans rows
        MaskedRow(2, 2, ()),  # 8 bits exactly
        MaskedRow(5, 7, ((6, 9, 2, 5), (0, 100, 11, 12))),
        MaskedRow(10, 6, ((0, 100, 0, 100),)),  # all hidden
        MaskedRow(40, 25, ((45, 60, 3, 33), (50, 51, 0, 64), (10, 20, 0, 5))),
    ],
)
def test_pack_masks_torch_edge_rows(row):
    _check_packed([row])
    _check_packed([row, MaskedRow(1, 2, ()), row])


def test_dense_reference_is_not_trivial():
    # The reference is causal and hides what the rectangles cover.
    m = dense_mask(MaskedRow(2, 3, ((3, 4, 0, 2),)))
    assert m.tolist() == [
        [True, True, True, False, False],
        [False, False, True, True, False],
        [True, True, True, True, True],
    ]


@settings(max_examples=40, deadline=None)
@given(st.lists(_row, min_size=1, max_size=4))
def test_pack_masks_on_cpu_is_pack_masks_torch(rows):
    packed, indptr = pack_masks(rows, "cpu")
    want, want_indptr = pack_masks_torch(rows)
    assert torch.equal(packed, want) and torch.equal(indptr, want_indptr)


def test_rect_tensors_are_the_kernels_inputs():
    rows = [
        MaskedRow(3, 2, ((1, 2, 3, 4), (5, 6, 7, 8))),
        MaskedRow(0, 4, ()),
        MaskedRow(1, 1, ((0, 9, 0, 1),)),
    ]
    t = rect_tensors(rows)
    assert all(v.dtype == torch.int32 for v in t.values())
    assert t["starts"].tolist() == [3, 0, 1] and t["q_lens"].tolist() == [2, 4, 1]
    assert t["byte_indptr"].tolist() == packed_reference(rows)[1]
    assert t["rect_indptr"].tolist() == [0, 2, 2, 3]
    assert t["rects"].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [0, 9, 0, 1]]
