"""The Multiverse mask of a step's masked rows, dense or as FlashInfer's
packed bit mask.

The scheduler sends, per request, hidden rectangles ``(q0, q1, k0, k1)`` in
token indices (:mod:`vllm_multiverse.tree.masks`); everything else is causal.
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
from vllm_multiverse.tree.masks import Rect


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


def allowed_rows(rects, start: int, end: int, device=None) -> torch.Tensor:
    """Boolean [end - start, end]: query row r (token start + r) may see key k."""
    q = torch.arange(start, end, device=device).unsqueeze(1)
    allowed = torch.arange(end, device=device).unsqueeze(0) <= q
    for q0, q1, k0, k1 in rects:
        allowed[max(q0, start) - start : max(0, min(q1, end) - start), k0:k1] = False
    return allowed


def byte_indptr(rows: list[MaskedRow]) -> list[int]:
    out = [0]
    for row in rows:
        out.append(out[-1] + row.num_bytes)
    return out


_BIT_WEIGHTS = [1 << b for b in range(8)]


def pack_masks_torch(rows: list[MaskedRow], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 mask, int32 byte indptr [len(rows) + 1]) in torch ops."""
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.int32, device=device)
    parts = []
    for row in rows:
        bits = allowed_rows(row.rects, row.start, row.kv_len, device).reshape(-1)
        pad = row.num_bytes * 8 - bits.numel()
        bits = torch.nn.functional.pad(bits, (0, pad)).view(-1, 8)
        parts.append((bits.to(torch.int32) * weights).sum(1).to(torch.uint8))
    packed = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8, device=device)
    return packed, torch.tensor(byte_indptr(rows), dtype=torch.int32, device=device)


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
