"""Attention of a step's masked rows over the paged KV cache, recomputed
after the backend's causal kernel (the KV write has already run).

A :class:`MaskedBatch` is what the model runner hands the attention backend
once per step: for each masked row, where its queries sit in the batch, its
Multiverse mask (:class:`~vllm_multiverse.kernels.packed_mask.MaskedRow`) and
its kernel block ids. Every layer of the step reads it, so whatever is
derived from it (dense masks, the packed mask, a FlashInfer plan) is built
once and cached on it.

Three routes, same result:
- the CPU kernel (``csrc/cpu/masked_attention.cpp``, ``kernels/cpu_masked.py``)
  over vLLM's "vec" cache in place, hidden ranges skipped: the CPU route
  where it builds (the attention backend runs it for whole steps, its
  rectangles from :meth:`MaskedBatch.request_rects`);
- :class:`FlashInferMaskedPrefill`: FlashInfer's paged prefill with the
  packed custom mask (its FA2 kernels, the only ones that take a mask), all
  masked rows in one call per layer;
- :func:`sdpa_masked_rows`: ``torch.nn.functional.scaled_dot_product_attention``
  over K/V gathered through the block table, with the dense mask: rows of
  one query (sequential decoding) batched in groups of similar length, the
  others one by one; the CPU route where the kernel is absent (its spec in
  the tests), and a debugging route on CUDA
  (``--multiverse-masked-attention sdpa``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from vllm_multiverse.kernels.packed_mask import MaskedRow, allowed_rows, pack_masks

# (kv_cache, kernel block ids [rows, blocks]) -> K, V, each
# [rows, blocks * page_size, kv_heads, head_size]: each row's tokens in order.
Gather = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

# Gathered K and V of one batched group of decode rows, at most.
GROUP_BYTES = 64 * 2**20


@dataclass(frozen=True)
class DecodeGroup:
    rows: list[int]  # its rows of the batch
    queries: torch.Tensor  # flat batch index of each row's query
    blocks: torch.Tensor  # [rows, pages] kernel block ids, padded
    mask: torch.Tensor  # [rows, 1, 1, pages * page_size] bool: may attend


@dataclass
class MaskedBatch:
    rows: list[MaskedRow]
    # Flat index, in the step's batch, of each row's first query.
    offsets: list[int]
    # Each row's kernel block ids, at least ceil(kv_len / page_size) of them.
    block_ids: Sequence[np.ndarray]
    page_size: int
    _cache: dict = field(default_factory=dict, repr=False)

    def __bool__(self) -> bool:
        return bool(self.rows)

    def cached(self, key, build):
        value = self._cache.get(key)
        if value is None:
            value = self._cache[key] = build()
        return value

    def num_pages(self, i: int) -> int:
        return -(-self.rows[i].kv_len // self.page_size)

    def query_index(self, device) -> torch.Tensor:
        """Flat batch indices of all masked queries, row after row."""

        def build():
            idx = np.concatenate([np.arange(a, a + r.q_len) for a, r in zip(self.offsets, self.rows)])
            return torch.from_numpy(idx).to(device)

        return self.cached(("index", str(device)), build)

    def dense(self, i: int, device) -> torch.Tensor:
        row = self.rows[i]
        return self.cached(("dense", i, str(device)), lambda: allowed_rows(row.rects, row.start, row.kv_len, device))

    def decode_groups(self, max_tokens: int, device) -> list[DecodeGroup]:
        """The rows of one query each in groups of similar length, each
        padded to its longest row's pages and holding at most ``max_tokens``
        gathered tokens: one gather and one SDPA call a group. None for
        fewer than two such rows (nothing to batch)."""

        def build():
            single = [i for i, r in enumerate(self.rows) if r.q_len == 1]
            if len(single) < 2:
                return []
            order = sorted(single, key=lambda i: self.rows[i].kv_len)
            groups, cur = [], []
            for i in order:  # ascending: the newest row is the longest
                if cur and (len(cur) + 1) * self.num_pages(i) * self.page_size > max_tokens:
                    groups.append(self._decode_group(cur, device))
                    cur = []
                cur.append(i)
            groups.append(self._decode_group(cur, device))
            return groups

        return self.cached(("decode", max_tokens, str(device)), build)

    def _decode_group(self, rows: list[int], device) -> DecodeGroup:
        pages = max(self.num_pages(i) for i in rows)
        blocks = np.zeros((len(rows), pages), dtype=np.int64)  # padding: any block, masked out
        mask = torch.zeros(len(rows), 1, 1, pages * self.page_size, dtype=torch.bool)
        for j, i in enumerate(rows):
            row = self.rows[i]
            blocks[j, : self.num_pages(i)] = self.block_ids[i][: self.num_pages(i)]
            mask[j, 0, 0, : row.kv_len] = allowed_rows(row.rects, row.start, row.kv_len)[0]
        queries = torch.tensor([self.offsets[i] for i in rows], dtype=torch.long)
        return DecodeGroup(rows, queries.to(device), torch.from_numpy(blocks).to(device), mask.to(device))

    def request_rects(self, query_start_loc: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(rect_indptr, rects) for every request of the step (rows with no
        mask have none), the requests found by their first query."""

        def build():
            from vllm_multiverse.kernels.cpu_masked import row_rects

            per_request: list[tuple] = [()] * (len(query_start_loc) - 1)
            for a, row in zip(self.offsets, self.rows):
                per_request[int(np.searchsorted(query_start_loc, a))] = row.rects
            return row_rects(per_request)

        return self.cached("request_rects", build)

    def blocks(self, i: int, device) -> torch.Tensor:
        return self.cached(
            ("blocks", i, str(device)),
            lambda: torch.from_numpy(np.ascontiguousarray(self.block_ids[i][: self.num_pages(i)])).long().to(device),
        )


def sdpa_masked_rows(
    batch: MaskedBatch,
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    output: torch.Tensor,
    scale: float,
    gather: Gather,
) -> None:
    """Overwrite the masked rows of ``output`` ([tokens, heads * head_size]
    or [tokens, heads, head_size]) with SDPA under their masks: the rows of
    one query each (sequential decoding) batched, a gather and an SDPA call
    per group of them; longer rows (prefills, recomputes) one by one."""
    gqa = query.shape[1] != kv_cache.shape[1]
    heads, d = query.shape[1], query.shape[2]
    out = output.view(output.shape[0], heads, d)
    row_bytes = 2 * kv_cache.shape[1] * d * kv_cache.element_size()
    groups = batch.decode_groups(GROUP_BYTES // row_bytes, kv_cache.device)
    for group in groups:
        k, v = gather(kv_cache, group.blocks)
        o = F.scaled_dot_product_attention(
            query.index_select(0, group.queries).unsqueeze(2),  # [rows, heads, 1, d]
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=group.mask,
            scale=scale,
            enable_gqa=gqa,
        )
        out.index_copy_(0, group.queries, o.squeeze(2).to(out.dtype))
    batched = {i for group in groups for i in group.rows}
    for i in (i for i in range(len(batch.rows)) if i not in batched):
        a, row = batch.offsets[i], batch.rows[i]
        b = a + row.q_len
        k, v = gather(kv_cache, batch.blocks(i, kv_cache.device)[None])
        o = F.scaled_dot_product_attention(
            query[a:b].transpose(0, 1),
            k[0, : row.kv_len].transpose(0, 1),
            v[0, : row.kv_len].transpose(0, 1),
            attn_mask=batch.dense(i, query.device),
            scale=scale,
            enable_gqa=gqa,
        )
        out[a:b] = o.transpose(0, 1).to(out.dtype)


def logical_kv(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V views ``[blocks, kv_heads, n, head_size]`` of vLLM's logical
    per-layer GPU cache ``[blocks, kv_heads, n, 2 * head_size]``."""
    return kv_cache.chunk(2, dim=-1)


def gather_logical(kv_cache: torch.Tensor, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:data:`Gather` for the logical view (any physical order)."""
    rows, nb = blocks.shape
    out = []
    for half in logical_kv(kv_cache):
        _, heads, n, d = half.shape
        g = half[blocks.reshape(-1)].view(rows, nb, heads, n, d)
        out.append(g.transpose(2, 3).reshape(rows, nb * n, heads, d))
    return out[0], out[1]


def flashinfer_layout(kv_cache: torch.Tensor) -> str:
    """FlashInfer's name for the physical order of a logical view: heads
    outside tokens ("HND") or tokens outside heads ("NHD")."""
    return "HND" if kv_cache.stride(1) >= kv_cache.stride(2) else "NHD"


def flashinfer_paged_kv(kv_cache: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The (K, V) pair FlashInfer reads, in its ``layout`` shape (strided
    views, as vLLM's own FlashInfer backend passes them)."""
    k, v = logical_kv(kv_cache)
    if layout == "NHD":
        return k.transpose(1, 2), v.transpose(1, 2)
    return k, v


class FlashInferMaskedPrefill:
    """A FlashInfer paged prefill for the masked rows of one step shape
    (heads, head size, dtype, layout); ``plan`` once per step, ``run`` per layer.

    FlashInfer 0.7.0.post1 (vLLM 0.32's pin) computes ``mask_indptr`` in bits
    when ``packed_custom_mask`` is passed, but its kernel reads it as the byte
    offset of each request's packed segment (flashinfer PR #2201); the byte
    offsets are set after ``plan``. With one masked row both agree (0).
    """

    WORKSPACE_BYTES = 128 * 1024 * 1024

    def __init__(self, device, layout: str) -> None:
        from flashinfer import BatchPrefillWithPagedKVCacheWrapper

        self.layout = layout
        workspace = torch.empty(self.WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.wrapper = BatchPrefillWithPagedKVCacheWrapper(workspace, layout, backend="fa2")
        self.device = torch.device(device)

    def plan(
        self,
        batch: MaskedBatch,
        num_qo_heads: int,
        num_kv_heads: int,
        head_size: int,
        q_dtype: torch.dtype,
        kv_dtype: torch.dtype,
        scale: float,
    ) -> None:
        n = len(batch.rows)
        q_lens = np.array([r.q_len for r in batch.rows], dtype=np.int32)
        pages = np.array([batch.num_pages(i) for i in range(n)], dtype=np.int32)
        kv_lens = np.array([r.kv_len for r in batch.rows], dtype=np.int32)
        qo_indptr = np.zeros(n + 1, dtype=np.int32)
        qo_indptr[1:] = np.cumsum(q_lens)
        kv_indptr = np.zeros(n + 1, dtype=np.int32)
        kv_indptr[1:] = np.cumsum(pages)
        indices = np.concatenate([batch.block_ids[i][: pages[i]] for i in range(n)]).astype(np.int32)
        last_page_len = kv_lens - (pages - 1) * batch.page_size
        packed, byte_indptr = pack_masks(batch.rows, self.device)
        self.wrapper.plan(
            torch.from_numpy(qo_indptr),
            torch.from_numpy(kv_indptr),
            torch.from_numpy(indices).to(self.device),
            torch.from_numpy(last_page_len.astype(np.int32)),
            num_qo_heads,
            num_kv_heads,
            head_size,
            batch.page_size,
            packed_custom_mask=packed,
            causal=False,
            sm_scale=scale,
            q_data_type=q_dtype,
            kv_data_type=kv_dtype,
        )
        self.wrapper._mask_indptr_buf = byte_indptr.to(self.device)

    def run(self, batch: MaskedBatch, query: torch.Tensor, kv_cache: torch.Tensor, output: torch.Tensor) -> None:
        index = batch.query_index(query.device)
        heads, d = query.shape[1], query.shape[2]
        o = self.wrapper.run(query.index_select(0, index), flashinfer_paged_kv(kv_cache, self.layout))
        output.view(output.shape[0], heads, d).index_copy_(0, index, o.to(output.dtype))
