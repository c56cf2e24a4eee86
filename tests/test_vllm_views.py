"""tests/vllm_views.py, the replica of vLLM 0.32's per-layer KV cache views
that the GPU machine (no vLLM there) runs the copy kernel on, against vLLM's
own allocation; and the merge's copy on those views."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import vllm.v1.kv_cache_layout
import vllm_views
from kernel_cases import random_copies, reference_copy
from vendor.kv_cache_layout import KVCacheLayout
from vllm.v1.attention.backend import MultipleOf
from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheGroupSpec
from vllm.v1.worker.utils import allocate_kv_cache

from vllm_multiverse.kernels.kv_copy import copy_token_slots

HEADS, HEAD_SIZE, BLOCKS, BLOCK = 4, 8, 6, 64


def test_vendored_layout_is_vllms():
    vendored = Path(__file__).parent / "vendor" / "kv_cache_layout.py"
    assert vendored.read_bytes() == Path(vllm.v1.kv_cache_layout.__file__).read_bytes()


def _vllm_config(layout: KVCacheLayout, num_layers: int, kernel_block: int, dtype):
    """(layer names, KV cache config) as vLLM's engine core makes them
    (``get_kv_cache_config_from_groups``) for one group of ``num_layers``
    full-attention layers. The spec's alignment is what
    ``customize_attention_spec`` gives a backend with fixed kernel block sizes."""
    vllm_layout = vllm.v1.kv_cache_layout.KVCacheLayout[layout.name]
    spec = FullAttentionSpec(
        block_size=BLOCK,
        num_kv_heads=HEADS,
        head_size=HEAD_SIZE,
        dtype=dtype,
        block_stride_alignment=MultipleOf(kernel_block),
    )
    names = [f"layers.{i}.attn" for i in range(num_layers)]
    # The fields of VllmConfig that get_kv_cache_config_from_groups reads.
    config = SimpleNamespace(
        attention_config=SimpleNamespace(hisparse_config=None),
        cache_config=SimpleNamespace(
            get_resolved_kv_cache_layout=lambda: vllm_layout,
            num_gpu_blocks_override=BLOCKS,
            prefix_cache_retention_interval=None,
        ),
    )
    return names, get_kv_cache_config_from_groups(config, [KVCacheGroupSpec(names, spec)], 1 << 30)


def _bytes(kv: torch.Tensor) -> torch.Tensor:
    return kv.view(torch.int8)


CASES = [
    (layout, num_layers, kernel_block, dtype)
    for layout in KVCacheLayout
    for num_layers in (1, 3)
    for kernel_block in (BLOCK, 16)
    for dtype in (torch.bfloat16, torch.float32)
]


@pytest.mark.parametrize(
    "layout,num_layers,kernel_block,dtype",
    CASES,
    ids=[f"{c[0].name}-L{c[1]}-k{c[2]}-{str(c[3])[6:]}" for c in CASES],
)
def test_replica_views_are_vllms(layout, num_layers, kernel_block, dtype):
    names, kv_config = _vllm_config(layout, num_layers, kernel_block, dtype)
    (tensor,) = kv_config.kv_cache_tensors
    elt = torch.empty((), dtype=dtype).element_size()
    mine = vllm_views.cache_tensor(layout, num_layers, BLOCKS, BLOCK, HEADS, 2 * HEAD_SIZE * elt)
    assert (mine.size, mine.layer_stride, mine.block_stride) == (tensor.size, tensor.layer_stride, tensor.block_stride)
    if kernel_block < BLOCK and tensor.block_stride > tensor.layer_stride:
        return  # other layers' pages between blocks: vLLM never splits them (prepare_kernel_block_sizes)
    replica = lambda: vllm_views.kv_cache_views(  # noqa: E731
        layout, num_layers, BLOCKS, BLOCK, kernel_block, HEADS, HEAD_SIZE, dtype
    )
    vllm_layout = vllm.v1.kv_cache_layout.KVCacheLayout[layout.name]
    try:
        views = allocate_kv_cache(kv_config, torch.device("cpu"), vllm_layout, [kernel_block])
    except ValueError:
        # A block that is not one dense page (other heads between its kernel
        # blocks) cannot be split: vLLM refuses, so must the replica.
        with pytest.raises(ValueError):
            replica()
        return
    want = [views[name] for name in names]
    raw, got = replica()
    want_raw = torch.empty(0, dtype=torch.int8).set_(want[0].untyped_storage())
    assert raw.numel() == want_raw.numel()
    assert all(kv.untyped_storage().data_ptr() == want_raw.data_ptr() for kv in want)
    for g, w in zip(got, want):
        assert (g.shape, g.stride(), g.storage_offset(), g.dtype) == (w.shape, w.stride(), w.storage_offset(), w.dtype)
    # The same bytes in both buffers: every view reads the same bytes.
    raw.copy_(torch.randint(-128, 128, raw.shape, dtype=torch.int8, generator=torch.Generator().manual_seed(0)))
    want_raw.copy_(raw)
    assert all(torch.equal(_bytes(g), _bytes(w)) for g, w in zip(got, want))


# The layouts vLLM's GPU backends use (NHD, HND) and a block-outermost one,
# which vLLM never splits into kernel blocks (prepare_kernel_block_sizes).
COPY_CASES = [("LBNHC", 16), ("LBHNC", 16), ("BLNHC", BLOCK)]


@pytest.mark.parametrize("layout,kernel_block", COPY_CASES)
def test_copy_token_slots_on_vllm_views(layout, kernel_block):
    """Slots in scheduler (manager) blocks of 64 tokens; the views in kernel
    blocks of ``kernel_block``."""
    raw, views = vllm_views.kv_cache_views(
        KVCacheLayout[layout], 3, BLOCKS, BLOCK, kernel_block, HEADS, HEAD_SIZE, torch.bfloat16
    )
    raw.copy_(torch.randint(-128, 128, raw.shape, dtype=torch.int8, generator=torch.Generator().manual_seed(1)))
    copies = random_copies(np.random.default_rng(2), BLOCKS * BLOCK, 100)
    want = reference_copy(views, copies, BLOCK)
    copy_token_slots(views, copies)
    assert all(torch.equal(_bytes(kv), _bytes(w)) for kv, w in zip(views, want))
