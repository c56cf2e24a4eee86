"""vLLM 0.32's per-layer KV cache views, rebuilt without vLLM, so the GPU
machine (which has no vLLM) can run the merge's copy kernel on exactly the
tensors a vLLM worker hands the attention backends.

vLLM allocates ONE int8 buffer for all layers and views it per layer with
``torch.as_strided``; a layer's logical view ``[B, H, N, C]`` has strides
set by the layout (``KVCacheLayout``, vendored as ``vendor/kv_cache_layout.py``)
and, where the manager block is split into kernel blocks, B counts kernel
blocks. This follows, for one cache group of same-shaped full-attention
layers with dense K/V content (no padding, no quantization), the code of:

- ``get_kv_cache_config_from_groups`` (``v1/core/kv_cache_utils.py``): the
  buffer's size, layer stride and block stride (one ``KVCacheTensor``);
- ``allocate_kv_cache`` (``v1/worker/utils.py``): one zeroed int8 buffer;
- ``create_kv_cache_views``, ``compute_layout_strides`` and
  ``compute_layer_kv_cache_shape_bytes`` (``v1/kv_cache_interface.py``).

``tests/test_vllm_views.py`` checks it against vLLM's own functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import torch
from vendor.kv_cache_layout import KVCacheLayout


@dataclass(frozen=True)
class CacheTensor:
    """vLLM's ``KVCacheTensor`` of the group."""

    size: int
    layer_stride: int
    block_stride: int


def shape_bytes(num_blocks: int, block_size: int, kernel_block_size: int, num_kv_heads: int, content_bytes: int):
    """``compute_layer_kv_cache_shape_bytes``: logical (B, H, N, C bytes)."""
    assert block_size % kernel_block_size == 0
    return (num_blocks * (block_size // kernel_block_size), num_kv_heads, kernel_block_size, content_bytes)


def layout_strides(shape: tuple[int, ...], layout: KVCacheLayout, fixed=(None,) * 5) -> tuple[int, ...]:
    """``compute_layout_strides`` (no padded pages): byte strides of the
    logical ``[L, B, H, N, C]`` shape, innermost physical axis first."""
    strides = [0] * 5
    current = 1
    for dim in reversed(layout.stride_order):
        strides[dim] = fixed[dim] or current
        current = strides[dim] * shape[dim]
    return tuple(strides)


def cache_tensor(
    layout: KVCacheLayout, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, content_bytes: int
) -> CacheTensor:
    """``get_kv_cache_config_from_groups`` for one group of one spec: every
    layer's page packed per block (block-outermost layouts) or every layer its
    own region (layer-outermost ones)."""
    page = num_kv_heads * block_size * content_bytes
    bytes_per_block = num_layers * page
    block_stride = bytes_per_block if layout.is_block_outermost else None
    shape = (num_layers, *shape_bytes(num_blocks, block_size, block_size, num_kv_heads, content_bytes))
    strides = layout_strides(shape, layout, (None, block_stride, None, None, None))
    return CacheTensor(bytes_per_block * num_blocks, strides[0], strides[1])


def kv_cache_views(
    layout: KVCacheLayout,
    num_layers: int,
    num_blocks: int,
    block_size: int,
    kernel_block_size: int,
    num_kv_heads: int,
    head_size: int,
    dtype: torch.dtype,
    device="cpu",
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(the int8 buffer, each layer's ``[kernel blocks, heads, kernel_block_size,
    2 * head_size]`` view in ``dtype``), as ``allocate_kv_cache`` and
    ``create_kv_cache_views`` make them. Raises ValueError where vLLM does:
    kernel blocks split from a block that is not one dense page."""
    content = 2 * head_size * torch.empty((), dtype=dtype).element_size()
    t = cache_tensor(layout, num_layers, num_blocks, block_size, num_kv_heads, content)
    raw = torch.zeros(t.size, dtype=torch.int8, device=device)
    logical = shape_bytes(num_blocks, block_size, kernel_block_size, num_kv_heads, content)
    ratio = logical[0] // num_blocks
    block_stride = t.block_stride
    if ratio > 1:
        dense_page = prod(shape_bytes(1, block_size, block_size, num_kv_heads, content)[1:])
        if block_stride != dense_page:
            raise ValueError(f"{layout.name}: block stride {block_stride} != page {dense_page}, cannot split")
        block_stride //= ratio
    shape = (num_layers, *logical)
    strides = layout_strides(shape, layout, (t.layer_stride, block_stride, None, None, None))
    view_5d = torch.as_strided(raw, size=shape, stride=strides, storage_offset=raw.storage_offset())
    return raw, [view_5d[i].view(dtype) for i in range(num_layers)]
