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
    cpu_peak_bytes,
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
    PACK_TRANSIENT_BYTES,
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


@settings(max_examples=60, deadline=None)
@given(st.lists(_row, min_size=1, max_size=4), st.integers(1, 64))
def test_pack_masks_in_chunks_is_packbits_of_the_dense_rule(rows, chunk_bytes):
    """The packing holds a chunk of query rows at a time (at least 8 rows,
    so every chunk starts on a byte); any chunk size gives the same bytes."""
    packed, indptr = pack_masks(rows, "cpu") if chunk_bytes == 64 else pack_masks_torch(rows, chunk_bytes=chunk_bytes)
    want, want_indptr = packed_reference(rows)
    assert indptr.tolist() == want_indptr and np.array_equal(packed.numpy(), want)


def test_pack_masks_never_holds_a_rows_dense_mask():
    """One row of 4k queries against 32k keys: 16 MiB packed, 128 MiB as a
    dense bool mask (four times that as the int32 the packing used to make);
    the chunked packing holds the packed bytes and a few chunks."""
    row = MaskedRow(32768 - 4096, 4096, ((30000, 31000, 100, 20000), (0, 40000, 5000, 6000)))
    dense_bytes = row.q_len * row.kv_len
    peak = cpu_peak_bytes(lambda: pack_masks([row], "cpu"))
    assert peak <= row.num_bytes + PACK_TRANSIENT_BYTES < dense_bytes
    packed, _ = pack_masks([row], "cpu")
    # Spot rows against the rule (the whole dense reference is what is avoided).
    for r in (0, 1, 1023, 1024, 2047, 3000, 4095):
        bits = np.zeros(row.kv_len, dtype=bool)  # keys after the query: hidden (causal)
        bits[: row.start + r + 1] = dense_mask(MaskedRow(row.start + r, 1, row.rects))[0]
        want = np.packbits(bits, bitorder="little")
        got = packed.numpy()[r * row.kv_len // 8 : (r + 1) * row.kv_len // 8]
        assert np.array_equal(got, want), r


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


@pytest.mark.parametrize("bad", [(-1, 5), (3, -16), (0, SCHED_BLOCKS * 32), (SCHED_BLOCKS * 32 + 7, 1)])
def test_a_slot_outside_the_cache_stops_the_copy(bad):
    """A pair outside the cache is a bookkeeping bug: the copy raises before
    touching any layer (torch indexing would wrap a negative slot around
    to the cache's last blocks; the CUDA kernel traps)."""
    base, caches, copies = _case("LBNHC", 16, 32, torch.float32)
    before = base.clone()
    with pytest.raises(IndexError, match="outside the cache"):
        copy_token_slots(caches, copies[:3] + [bad] + copies[3:])
    assert torch.equal(base, before)
