"""Random Multiverse sequences and paged KV caches for the masked-attention
checks (CPU and GPU). No vLLM: ``scripts/gpu_check.sh`` runs on a machine
without it."""

from __future__ import annotations

import numpy as np
import torch
from toy_vocab import TOKENS, VOCAB

from vllm_multiverse.kernels.masked_attention import MaskedBatch
from vllm_multiverse.kernels.packed_mask import MaskedRow
from vllm_multiverse.structure import analyze

# Orders of the per-layer tensor in memory, as permutations of the logical
# [blocks, heads, tokens, content] view (vLLM's NHD and HND).
LAYOUTS = {"NHD": (0, 2, 1, 3), "HND": (0, 1, 2, 3)}


def words(*ws: str) -> list[int]:
    return [VOCAB[w] for w in ws]


def structured_ids(rng: np.random.Generator, n_blocks: int, path_len: int, max_paths: int = 3) -> list[int]:
    """A prompt, then ``n_blocks`` Parallel blocks of 2..max_paths Paths of
    about ``path_len`` tokens each, with text between them."""
    fill = lambda k: [VOCAB[w] for w in rng.choice(["a", "b", "c", "d", "x", "y"], size=k)]  # noqa: E731
    ids = fill(int(rng.integers(5, 40)))
    for _ in range(n_blocks):
        p = int(rng.integers(2, max_paths + 1))
        labels = [str(i + 1) for i in range(p)]
        # The shape of the worked example (docs/structure.md).
        ids += words("<Parallel>", "\n", "<Goal>", "\n")
        for lab in labels:
            ids += words("<Outline>", lab, ":") + fill(3) + words("</Outline>")
        ids += words("</Goal>", "\n")
        for lab in labels:
            ids += words("<Path>", "\n", lab, ":") + fill(int(rng.integers(path_len // 2, path_len + 1)))
            ids += words("</Path>", "\n")
        ids += words("<Conclusion>", "\n") + fill(int(rng.integers(3, 12)))
        ids += words("</Conclusion>", "\n", "</Parallel>")
        ids += fill(int(rng.integers(2, 20)))
    return ids


def masked_case(rng, n_rows: int, n_blocks: int, path_len: int, q_len: int | None = None, in_path: bool = False):
    """Rows over structured sequences: (rows, dense masks [q_len, kv_len]).
    A row's queries are the last ``q_len`` tokens (all of them when None);
    ``in_path``: the sequence ends inside a Path that does not see them all
    (sequential decoding there)."""
    rows, dense = [], []
    for _ in range(n_rows):
        ids = structured_ids(rng, n_blocks, path_len)
        s = analyze(ids, TOKENS)
        assert s.well_formed, s.notes
        n = len(ids)
        if in_path:
            m = s.dense_mask()
            hiding = [t for t in range(n) if not m[t, : t + 1].all()]
            n = int(rng.choice(hiding)) + 1
            ids = ids[:n]
            s = analyze(ids, TOKENS)
        q = n if q_len is None else min(q_len, n)
        rows.append(MaskedRow(n - q, q, tuple(s.hidden_rects())))
        dense.append(torch.from_numpy(s.dense_mask()[n - q : n, :n].copy()))
    return rows, dense


def paged_cache(rng, rows, page_size, heads, head_size, dtype, device, layout, extra_blocks=3):
    """A per-layer cache in ``layout`` (logical view returned), each row's
    pages at random distinct blocks, and the rows' K/V as contiguous tensors."""
    pages = [-(-r.kv_len // page_size) for r in rows]
    num_blocks = sum(pages) + extra_blocks
    order = LAYOUTS[layout]
    phys_shape = [(num_blocks, heads, page_size, 2 * head_size)[i] for i in order]
    phys = torch.randn(phys_shape, generator=torch.Generator().manual_seed(int(rng.integers(1 << 30))))
    phys = phys.to(dtype=dtype, device=device)
    inverse = tuple(int(i) for i in np.argsort(order))
    kv = phys.permute(*inverse)
    perm = rng.permutation(num_blocks)
    block_ids, k_rows, v_rows, at = [], [], [], 0
    for r, p in zip(rows, pages):
        ids = perm[at : at + p].astype(np.int32)
        at += p
        block_ids.append(ids)
        blk = kv[torch.from_numpy(ids).long().to(device)]  # [p, H, N, 2D]
        flat = blk.transpose(1, 2).reshape(p * page_size, heads, 2 * head_size)[: r.kv_len]
        k_rows.append(flat[..., :head_size])
        v_rows.append(flat[..., head_size:])
    return kv, block_ids, k_rows, v_rows


def batch_of(rows, block_ids, page_size) -> MaskedBatch:
    offsets, at = [], 0
    for r in rows:
        offsets.append(at)
        at += r.q_len
    return MaskedBatch(rows, offsets, block_ids, page_size)


def step_inputs(rng, rows, page_size, q_heads, kv_heads, head_size, dtype, device, layout):
    """What a masked route is called with for ``rows``: the batch over a
    paged cache holding them, a random query and a zeroed output for every
    query row, the cache, and each row's K/V for the reference."""
    kv, block_ids, ks, vs = paged_cache(rng, rows, page_size, kv_heads, head_size, dtype, device, layout)
    batch = batch_of(rows, block_ids, page_size)
    total = sum(r.q_len for r in rows)
    query = torch.randn(total, q_heads, head_size, device=device, dtype=dtype)
    out = torch.zeros(total, q_heads * head_size, device=device, dtype=dtype)
    return batch, query, out, kv, ks, vs


def reference_attention(q, k, v, allowed, scale):
    """float64 softmax attention of one row: q [q, Hq, D], k/v [kv, Hk, D]."""
    rep = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(rep, dim=1)
    v = v.double().repeat_interleave(rep, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    s = s.masked_fill(~allowed.to(s.device), float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), v)


def vec_cache(rng, rows, block_size, heads, head_size, extra_blocks=3):
    """vLLM's CPU "vec" cache of one layer ([blocks, heads, block_size,
    2 * head_size]: per block and head, keys transposed, then values
    token-major; ``tests/test_kv_layout.py`` ties it to vLLM's writer), each
    row's tokens at random distinct blocks, every other slot NaN (what is
    never written must never be read into a result), and the rows' K/V."""
    pages = [-(-r.kv_len // block_size) for r in rows]
    num_blocks = sum(pages) + extra_blocks
    kv = torch.full((num_blocks, heads, block_size, 2 * head_size), float("nan"))
    keys = kv.view(num_blocks, heads, 2, head_size, block_size)
    values = kv.view(num_blocks, heads, 2, block_size, head_size)
    perm = rng.permutation(num_blocks)
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    block_ids, k_rows, v_rows, at = [], [], [], 0
    for r, p in zip(rows, pages):
        ids = perm[at : at + p].astype(np.int32)
        at += p
        k = torch.randn(r.kv_len, heads, head_size, generator=gen)
        v = torch.randn(r.kv_len, heads, head_size, generator=gen)
        t = torch.arange(r.kv_len)
        blk = torch.from_numpy(ids).long()[t // block_size]
        keys[blk, :, 0, :, t % block_size] = k
        values[blk, :, 1, t % block_size, :] = v
        block_ids.append(ids)
        k_rows.append(k)
        v_rows.append(v)
    return kv, block_ids, k_rows, v_rows


def structured_row(rng, kv_len: int, q_len: int, path_len: int):
    """One row of ``q_len`` queries against exactly ``kv_len`` keys, over a
    structured sequence (Parallel blocks of Paths of about ``path_len``
    tokens) cut so that its last token sits in a later Path (it does not see
    an earlier sibling): (row, the sequence's Structure)."""
    ids = structured_ids(rng, kv_len // path_len + 2, path_len)
    rects = analyze(ids, TOKENS).hidden_rects()
    last = max(min(q1, kv_len) - 1 for q0, q1, _, _ in rects if q0 < kv_len)
    # A longer prompt moves the last hiding token to the row's end.
    ids = [VOCAB["a"]] * (kv_len - 1 - last) + ids[: last + 1]
    s = analyze(ids, TOKENS)
    assert len(ids) == kv_len and not s.notes, s.notes
    return MaskedRow(kv_len - q_len, q_len, tuple(s.hidden_rects())), s


def mixed_case(rng, n_masked: int, n_causal: int):
    """A whole step: masked rows (prompts holding blocks, rows ending inside a
    Path) and causal rows (plain decodes and prefill chunks, no rectangles),
    shuffled: (rows, dense masks [q_len, kv_len], indices of the masked rows)."""
    rows, dense = masked_case(rng, n_masked, n_blocks=3, path_len=50)
    more, more_dense = masked_case(rng, n_masked, n_blocks=2, path_len=40, q_len=1, in_path=True)
    rows, dense = rows + more, dense + more_dense
    for _ in range(n_causal):
        kv_len = int(rng.integers(20, 600))
        q_len = int(rng.choice([1, 1, kv_len, int(rng.integers(1, kv_len + 1))]))
        rows.append(MaskedRow(kv_len - q_len, q_len, ()))
        dense.append(torch.ones(kv_len, kv_len, dtype=torch.bool).tril()[kv_len - q_len :])
    order = rng.permutation(len(rows))
    masked = [j for j, i in enumerate(order) if i < 2 * n_masked]
    return [rows[i] for i in order], [dense[i] for i in order], masked


def reference_attention_tiled(q, k, v, allowed, scale, q_tile: int = 1024):
    """:func:`reference_attention` for rows too long for one float64 score
    tensor (8k queries x 32k keys x 40 heads is 80 GiB): per tile of queries
    and per KV head, float64; returns float32 [q, Hq, D]. ``allowed`` [q, kv]
    may live on the host: a tile of it is copied to q's device once."""
    n, hq, d = q.shape
    hk = k.shape[1]
    rep = hq // hk
    out = torch.empty(n, hq, d, dtype=torch.float32, device=q.device)
    for t0 in range(0, n, q_tile):
        t1 = min(n, t0 + q_tile)
        hidden = ~allowed[t0:t1].to(q.device)
        for h in range(hk):
            heads = slice(h * rep, (h + 1) * rep)
            s = torch.einsum("trd,kd->rtk", q[t0:t1, heads].double(), k[:, h].double()) * scale
            p = torch.softmax(s.masked_fill_(hidden, float("-inf")), dim=-1)
            out[t0:t1, heads] = torch.einsum("rtk,kd->trd", p, v[:, h].double()).float()
    return out
