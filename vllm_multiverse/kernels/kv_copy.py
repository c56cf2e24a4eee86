"""The merge's KV copy on vLLM's logical per-layer cache view.

vLLM 0.32 hands every GPU attention backend a layer's cache as the logical
``[blocks, kv_heads, block_size, 2 * head_size]`` view (K and V concatenated
on the last axis) whatever the physical order (``v1/kv_cache_layout.py``), and
dim 0 may count kernel blocks, each scheduler block holding
``block_size // kernel_block_size`` of them (``copy_kv_cache_blocks_inplace``
in ``v1/worker/utils.py``). A scheduler slot ``block * block_size + offset``
is therefore kernel block ``slot // n`` at offset ``slot % n``, ``n`` being
the view's dim 2. Copying a token slot copies its row of every head, K and
V together, in every layer.

Sources and destinations of one call are disjoint and destinations distinct
(a merge copies a finished Path's KV into its parent's fresh blocks), so the
order of the copies does not matter.
"""

from __future__ import annotations

import torch

from vllm_multiverse.kernels import _ext


def unique_caches(kv_caches: list[torch.Tensor]) -> list[torch.Tensor]:
    """One view per storage: layers that share a cache are copied once."""
    seen: set[tuple[int, int]] = set()
    out = []
    for kv in kv_caches:
        key = (kv.untyped_storage().data_ptr(), kv.storage_offset())
        if key not in seen:
            seen.add(key)
            out.append(kv)
    return out


def check_slots(copies: list[tuple[int, int]], num_slots: int) -> None:
    """Raise for a slot outside the cache, on the host where the pairs are
    (no device sync): a bookkeeping error must stop the step, not turn into
    KV silently left uncopied."""
    lo = min(min(pair) for pair in copies)
    hi = max(max(pair) for pair in copies)
    if lo < 0 or hi >= num_slots:
        bad = next(pair for pair in copies if not (0 <= pair[0] < num_slots and 0 <= pair[1] < num_slots))
        raise IndexError(f"Multiverse KV copy {bad} outside the cache's {num_slots} token slots")


def slot_tensors(copies: list[tuple[int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = torch.tensor(copies, dtype=torch.int64).reshape(-1, 2)
    if device.type == "cuda":
        pairs = pairs.pin_memory().to(device, non_blocking=True)
    return pairs[:, 0], pairs[:, 1]


def copy_token_slots(kv_caches: list[torch.Tensor], copies: list[tuple[int, int]]) -> None:
    """Copy the K and V of each ``(src_slot, dst_slot)`` in every layer: one
    kernel launch for all layers on CUDA when ``csrc/`` is built, torch
    indexing otherwise."""
    if not copies or not kv_caches:
        return
    caches = unique_caches(kv_caches)
    check_slots(copies, min(kv.shape[0] * kv.shape[2] for kv in caches))
    src, dst = slot_tensors(copies, caches[0].device)
    if caches[0].is_cuda and _ext.has_op("copy_kv_slots"):
        _ext.ops().copy_kv_slots(caches, src, dst)
    else:
        copy_token_slots_torch(caches, src, dst)


def copy_token_slots_torch(kv_caches: list[torch.Tensor], src: torch.Tensor, dst: torch.Tensor) -> None:
    """The semantics of the kernel, in torch indexing (any strides, any dtype)."""
    for kv in kv_caches:
        n = kv.shape[2]
        kv[dst // n, :, dst % n] = kv[src // n, :, src % n]
