"""The Multiverse mask of a step's masked rows, dense or as FlashInfer's
packed bit mask.

The scheduler sends, per request, hidden rectangles ``(q0, q1, k0, k1)`` in
token indices (:mod:`vllm_multiverse.structure.masks`); everything else is causal.
A masked row of a batch is the request's queries ``start .. start+q_len-1``
against its keys ``0 .. start+q_len-1``.

FlashInfer's paged prefill (``BatchPrefillWithPagedKVCacheWrapper``, FA2
kernels) reads a custom mask per request as the row-major ``[q_len, kv_len]``
bits, little bit order, each request's segment starting on a byte
(``flashinfer.quantization.segment_packbits``); bit set = may attend. The
kernel finds request ``i``'s segment at byte ``mask_indptr[i]``
(``variants.cuh``, ``DefaultAttention``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_multiverse.kernels import _ext
from vllm_multiverse.structure.masks import Rect


@dataclass(frozen=True)
class MaskedRow:
    start: int  # token index of the first query
    q_len: int
    rects: tuple[Rect, ...]

    @property
    def kv_len(self) -> int:
        return self.start + self.q_len

    @property
    def num_bytes(self) -> int:
        return -(-self.q_len * self.kv_len // 8)


def allowed_rows(rects, start: int, end: int, device=None, kv_len: int | None = None) -> torch.Tensor:
    """Boolean [end - start, kv_len]: query row r (token start + r) may see
    key k; ``kv_len`` defaults to ``end`` (the keys up to the last query)."""
    kv_len = end if kv_len is None else kv_len
    q = torch.arange(start, end, device=device).unsqueeze(1)
    allowed = torch.arange(kv_len, device=device).unsqueeze(0) <= q
    for q0, q1, k0, k1 in rects:
        allowed[max(q0, start) - start : max(0, min(q1, end) - start), k0:k1] = False
    return allowed


def byte_indptr(rows: list[MaskedRow]) -> list[int]:
    out = [0]
    for row in rows:
        out.append(out[-1] + row.num_bytes)
    return out


# Transient bytes of one chunk of the torch packing: the chunk's dense bool
# mask. A row of 8k queries against 32k keys is 256 Mbit, so it is packed
# a chunk of query rows at a time, never as one dense mask.
PACK_CHUNK_BYTES = 16 * 2**20
# What the torch packing holds beside the packed bytes: a chunk's mask, its
# padded copy, as uint8, shifted (the sum is a byte per 8), and small change.
PACK_TRANSIENT_BYTES = 4 * PACK_CHUNK_BYTES + 2**20


def _chunk_queries(kv_len: int, chunk_bytes: int) -> int:
    """Query rows per chunk: a multiple of 8, so every chunk of a row's
    segment starts on a byte (``8 * kv_len`` bits are whole bytes)."""
    return max(8, chunk_bytes // max(kv_len, 1) // 8 * 8)


def pack_masks_torch(
    rows: list[MaskedRow], device=None, chunk_bytes: int = PACK_CHUNK_BYTES
) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 mask, int32 byte indptr [len(rows) + 1]) in torch ops,
    holding at most about ``chunk_bytes`` of dense mask at a time."""
    indptr = byte_indptr(rows)
    packed = torch.empty(indptr[-1], dtype=torch.uint8, device=device)
    shifts = torch.arange(8, dtype=torch.uint8, device=device)
    for row, at in zip(rows, indptr):
        per = _chunk_queries(row.kv_len, chunk_bytes)
        for q0 in range(row.start, row.kv_len, per):
            q1 = min(q0 + per, row.kv_len)
            bits = allowed_rows(row.rects, q0, q1, device, kv_len=row.kv_len).reshape(-1)
            n = -(-bits.numel() // 8)
            bits = torch.nn.functional.pad(bits, (0, n * 8 - bits.numel())).view(n, 8)
            first = at + (q0 - row.start) * row.kv_len // 8
            packed[first : first + n] = (bits.to(torch.uint8) << shifts).sum(1, dtype=torch.uint8)
    return packed, torch.tensor(indptr, dtype=torch.int32, device=device)


def rect_tensors(rows: list[MaskedRow], device=None) -> dict[str, torch.Tensor]:
    """The kernel's inputs: per row its start, q_len, byte offset and
    rectangle range; all rectangles as int32 [R, 4]."""
    rect_indptr = [0]
    flat: list[int] = []
    for row in rows:
        for rect in row.rects:
            flat.extend(rect)
        rect_indptr.append(len(flat) // 4)
    i32 = dict(dtype=torch.int32, device=device)
    return {
        "starts": torch.tensor([r.start for r in rows], **i32),
        "q_lens": torch.tensor([r.q_len for r in rows], **i32),
        "byte_indptr": torch.tensor(byte_indptr(rows), **i32),
        "rect_indptr": torch.tensor(rect_indptr, **i32),
        "rects": torch.tensor(flat, **i32).reshape(-1, 4),
    }


def pack_masks(rows: list[MaskedRow], device) -> tuple[torch.Tensor, torch.Tensor]:
    """What :func:`pack_masks_torch` returns; one kernel launch on CUDA when
    ``csrc/`` is built."""
    device = torch.device(device)
    if device.type == "cuda" and rows and _ext.has_op("pack_masks"):
        t = rect_tensors(rows, "cpu")
        t = {k: v.pin_memory().to(device, non_blocking=True) for k, v in t.items()}
        total = byte_indptr(rows)[-1]
        packed = _ext.ops().pack_masks(
            t["starts"], t["q_lens"], t["byte_indptr"], t["rect_indptr"], t["rects"], total
        )
        return packed, t["byte_indptr"]
    return pack_masks_torch(rows, device)
