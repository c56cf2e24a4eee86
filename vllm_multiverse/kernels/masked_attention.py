"""Attention of a step that has masked rows, over the paged KV cache (the
step's KV write has already run).

A :class:`MaskedBatch` is what the model runner hands the attention backend
once per step that has masked rows: every request of the step, in the
step's order (where its queries sit, its Multiverse mask as a
:class:`~vllm_multiverse.kernels.packed_mask.MaskedRow`, whose rectangles
are empty for a causal request, its kernel block ids), and which of them
are masked. Every layer of the step reads it, so whatever is derived from it
(dense masks, the packed mask, a FlashInfer plan) is built once and cached
on it.

Three routes, same result:
- the CPU kernel (``csrc/cpu/masked_attention.cpp``, ``kernels/cpu_masked.py``)
  over vLLM's "vec" cache in place, hidden ranges skipped: every request of
  the step in place of vLLM's kernel (its rectangles from
  :meth:`MaskedBatch.request_rects`);
- :class:`FlashInferMaskedPrefill`: FlashInfer's paged prefill with the
  packed custom mask (its FA2 kernels, the only ones that take a mask),
  every request of the step in one call per layer, in place of vLLM's
  kernel;
- :func:`sdpa_masked_rows`: ``torch.nn.functional.scaled_dot_product_attention``
  over K/V gathered through the block table, with the dense mask, for the
  masked rows only, overwriting what vLLM's kernel wrote for them: rows of
  one query (sequential decoding) batched in groups of similar length, the
  others one by one in tiles of queries. Query heads are grouped per KV head
  rather than passed with ``enable_gqa``: a mask together with
  ``enable_gqa`` leaves PyTorch only its math kernel, which materialises
  float32 scores for every head (40 GiB for 8k queries against 32k keys of
  a Multiverse-32B layer), while grouped heads take the memory-efficient
  kernel; :func:`sdpa_peak_bytes` bounds what a row holds at once. The CPU
  route where the kernel is absent (its spec in the tests), and the CUDA
  route where FlashInfer is absent or cannot be built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from vllm_multiverse.kernels.packed_mask import PACK_TRANSIENT_BYTES, MaskedRow, allowed_rows, pack_masks

# (kv_cache, kernel block ids [rows, blocks]) -> K, V, each
# [rows, blocks * page_size, kv_heads, head_size]: each row's tokens in order.
Gather = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

# Gathered K and V of one batched group of decode rows, at most.
GROUP_BYTES = 64 * 2**20
# Mask bytes of one query tile of a long row, at most: the tile's boolean
# mask repeated for the query heads of a KV head, and the additive mask
# SDPA makes of it (float32 on CPU; padded to 16 keys on CUDA: counted twice).
TILE_BYTES = 128 * 2**20
_MASK_BYTES_PER_ELEMENT = 1 + 2 * 4


@dataclass(frozen=True)
class DecodeGroup:
    rows: list[int]  # its rows of the batch
    queries: torch.Tensor  # flat batch index of each row's query
    blocks: torch.Tensor  # [rows, pages] kernel block ids, padded
    mask: torch.Tensor  # [rows, 1, 1, pages * page_size] bool: may attend


@dataclass
class MaskedBatch:
    # Every request of the step, in the step's order.
    rows: list[MaskedRow]
    # Flat index, in the step's batch, of each row's first query.
    offsets: list[int]
    # Each row's kernel block ids, at least ceil(kv_len / page_size) of them.
    block_ids: Sequence[np.ndarray]
    page_size: int
    # The rows the scheduler masked (what SDPA recomputes); None: all.
    masked: Sequence[int] | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def __bool__(self) -> bool:
        return bool(self.rows)

    def cached(self, key, build):
        value = self._cache.get(key)
        if value is None:
            value = self._cache[key] = build()
        return value

    def masked_rows(self) -> Sequence[int]:
        return range(len(self.rows)) if self.masked is None else self.masked

    def num_pages(self, i: int) -> int:
        return -(-self.rows[i].kv_len // self.page_size)

    def decode_groups(self, max_tokens: int, device) -> list[DecodeGroup]:
        """The masked rows of one query each in groups of similar length,
        each padded to its longest row's pages and holding at most
        ``max_tokens`` gathered tokens: one gather and one SDPA call a
        group. Empty for fewer than two such rows (nothing to batch)."""

        def build():
            single = [i for i in self.masked_rows() if self.rows[i].q_len == 1]
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

    def request_rects(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rect_indptr, rects) of every request of the step, in the CPU
        kernel's form."""

        def build():
            from vllm_multiverse.kernels.cpu_masked import row_rects

            return row_rects([row.rects for row in self.rows])

        return self.cached("request_rects", build)

    def blocks(self, i: int, device) -> torch.Tensor:
        return self.cached(
            ("blocks", i, str(device)),
            lambda: torch.from_numpy(np.ascontiguousarray(self.block_ids[i][: self.num_pages(i)])).long().to(device),
        )


def _heads_grouped(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[n, Hq, d] -> [1, Hkv, n * group, d]: the query heads that share a KV
    head as more queries of it (query ``t`` of head ``h * group + g`` at
    ``t * group + g``)."""
    n, hq, d = q.shape
    group = hq // num_kv_heads
    return q.reshape(n, num_kv_heads, group, d).permute(1, 0, 2, 3).reshape(1, num_kv_heads, n * group, d)


def _heads_ungrouped(o: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of :func:`_heads_grouped`: [n, Hq, d]."""
    _, hk, ng, d = o.shape
    group = ng // n
    return o.reshape(hk, n, group, d).permute(1, 0, 2, 3).reshape(n, hk * group, d)


def sdpa_tile_queries(kv_len: int, group: int, tile_bytes: int | None = None) -> int:
    """Queries of a long row per SDPA call: their mask bytes within
    :data:`TILE_BYTES`."""
    tile_bytes = TILE_BYTES if tile_bytes is None else tile_bytes
    return max(1, tile_bytes // (group * kv_len * _MASK_BYTES_PER_ELEMENT))


def sdpa_peak_bytes(
    q_len: int, kv_len: int, num_heads: int, num_kv_heads: int, head_size: int, dtype: torch.dtype, page_size: int
) -> int:
    """At most what :func:`sdpa_masked_rows` holds at once for one row of
    ``q_len`` queries against ``kv_len`` keys: its gathered K and V (whole
    pages; gathering V from a head-major cache holds its copy in page order
    beside the token-major one), then per tile of queries the grouped
    queries, the output, the masks and the softmax statistics."""
    elt = torch.empty((), dtype=dtype).element_size()
    group = num_heads // num_kv_heads
    gathered = 3 * -(-kv_len // page_size) * page_size * num_kv_heads * head_size * elt
    tile = min(q_len, sdpa_tile_queries(kv_len, group))
    # The mask is one per KV head's group of queries, shared by the KV heads.
    return gathered + tile * num_heads * (3 * head_size * elt + 4) + tile * group * kv_len * _MASK_BYTES_PER_ELEMENT


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
    per group of them; longer rows (prefills, recomputes) one by one, in
    tiles of :func:`sdpa_tile_queries` queries."""
    num_kv_heads = kv_cache.shape[1]
    heads, d = query.shape[1], query.shape[2]
    group = heads // num_kv_heads
    out = output.view(output.shape[0], heads, d)
    row_bytes = 2 * num_kv_heads * d * kv_cache.element_size()
    groups = batch.decode_groups(GROUP_BYTES // row_bytes, kv_cache.device)
    for dg in groups:
        k, v = gather(kv_cache, dg.blocks)
        rows = len(dg.rows)
        # A decode row's query heads of one KV head are its queries there.
        q = query.index_select(0, dg.queries).view(rows, num_kv_heads, group, d)
        o = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=dg.mask, scale=scale)
        out.index_copy_(0, dg.queries, o.reshape(rows, heads, d).to(out.dtype))
    batched = {i for dg in groups for i in dg.rows}
    for i in (i for i in batch.masked_rows() if i not in batched):
        a, row = batch.offsets[i], batch.rows[i]
        k, v = gather(kv_cache, batch.blocks(i, kv_cache.device)[None])
        k = k[:, : row.kv_len].transpose(1, 2)  # [1, Hkv, kv_len, d]
        v = v[:, : row.kv_len].transpose(1, 2)
        tile = sdpa_tile_queries(row.kv_len, group)
        for t0 in range(0, row.q_len, tile):
            t1 = min(t0 + tile, row.q_len)
            allowed = allowed_rows(row.rects, row.start + t0, row.start + t1, query.device, kv_len=row.kv_len)
            o = F.scaled_dot_product_attention(
                _heads_grouped(query[a + t0 : a + t1], num_kv_heads),
                k,
                v,
                attn_mask=allowed.repeat_interleave(group, dim=0),
                scale=scale,
            )
            out[a + t0 : a + t1] = _heads_ungrouped(o, t1 - t0).to(out.dtype)


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
    """A FlashInfer paged prefill for the whole of a step that has masked rows
    (every request, a causal one with a causal mask), for one shape (heads,
    head size, dtype, layout); ``plan`` once per step, ``run`` per layer.

    FlashInfer 0.7.0.post1 (vLLM 0.32's pin) computes ``mask_indptr`` in bits
    when ``packed_custom_mask`` is passed, but its kernel reads it as the byte
    offset of each request's packed segment (flashinfer PR #2201); the byte
    offsets are set after ``plan``. With one masked row both agree (0).
    """

    def __init__(self, workspace: torch.Tensor, layout: str) -> None:
        from flashinfer import BatchPrefillWithPagedKVCacheWrapper

        self.layout = layout
        self.wrapper = BatchPrefillWithPagedKVCacheWrapper(workspace, layout, backend="fa2")
        self.device = workspace.device

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
        if batch.offsets != np.concatenate([[0], np.cumsum(q_lens)[:-1]]).tolist():
            raise ValueError("FlashInfer's masked prefill takes a whole step: rows from query 0, in order, no gaps")
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
        """Every row of ``batch`` (the whole step: its queries are the first
        of ``query``, in order) into ``output``."""
        n = batch.offsets[-1] + batch.rows[-1].q_len
        heads, d = query.shape[1], query.shape[2]
        o = self.wrapper.run(query[:n], flashinfer_paged_kv(kv_cache, self.layout))
        output.view(output.shape[0], heads, d)[:n] = o.to(output.dtype)


FLASHINFER_WORKSPACE_BYTES = 128 * 2**20
# This process's FlashInfer workspace per device (one step plans one
# layout at a time, so the layouts share it) and prefill per (device, layout).
_WORKSPACES: dict[str, torch.Tensor] = {}
_PREFILLS: dict[tuple[str, str], FlashInferMaskedPrefill] = {}


def flashinfer_prefill(device, layout: str) -> FlashInferMaskedPrefill:
    """This process's FlashInfer prefill for ``(device, layout)``."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (str(device), layout)
    prefill = _PREFILLS.get(key)
    if prefill is None:
        workspace = _WORKSPACES.get(key[0])
        if workspace is None:
            workspace = _WORKSPACES[key[0]] = torch.empty(FLASHINFER_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        prefill = _PREFILLS[key] = FlashInferMaskedPrefill(workspace, layout)
    return prefill


def warm_up_flashinfer(device, num_heads: int, num_kv_heads: int, head_size: int, dtype: torch.dtype) -> float:
    """Build or load FlashInfer's FA2 masked-prefill module for this shape
    now, by planning and running a one-row masked batch over a one-page cache
    (the first time on a machine FlashInfer compiles it with nvcc: minutes;
    its JIT cache after), and allocate the workspace. Returns the seconds it
    took; raises what FlashInfer raises."""
    import time

    t0 = time.perf_counter()
    page = 16
    # vLLM's default physical order (NHD: tokens outside heads), logical view.
    kv = torch.zeros(1, page, num_kv_heads, 2 * head_size, dtype=dtype, device=device).transpose(1, 2)
    layout = flashinfer_layout(kv)
    batch = MaskedBatch([MaskedRow(0, 2, ((1, 2, 0, 1),))], [0], [np.zeros(1, dtype=np.int64)], page)
    query = torch.zeros(2, num_heads, head_size, dtype=dtype, device=device)
    output = torch.empty(2, num_heads * head_size, dtype=dtype, device=device)
    prefill = flashinfer_prefill(device, layout)
    prefill.plan(batch, num_heads, num_kv_heads, head_size, dtype, dtype, head_size**-0.5)
    prefill.run(batch, query, kv, output)
    torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def masked_scratch_bytes(
    route: str,
    max_tokens: int,
    max_model_len: int,
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    dtype: torch.dtype,
    page_size: int,
) -> int:
    """At most what a route allocates for one step beyond vLLM's own forward
    (which vLLM's memory profile counts): ``max_tokens`` queries a step,
    ``max_model_len`` keys a row. FlashInfer: the packed mask of the whole
    step, the torch packing's chunks (where ``csrc/`` is not built), the
    output it returns (its workspace is allocated at start-up). SDPA: its
    largest row (:func:`sdpa_peak_bytes`), or a group of decode rows."""
    elt = torch.empty((), dtype=dtype).element_size()
    if route == "flashinfer":
        packed = -(-max_tokens * max_model_len // 8)
        return packed + PACK_TRANSIENT_BYTES + max_tokens * num_heads * head_size * elt
    row = sdpa_peak_bytes(max_tokens, max_model_len, num_heads, num_kv_heads, head_size, dtype, page_size)
    decode = GROUP_BYTES * 3 // 2 + max_tokens * num_heads * head_size * elt * 2
    return max(row, decode)
