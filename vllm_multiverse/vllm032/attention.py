"""vLLM 0.32.0's attention backends, plus the Multiverse mask where a step
needs one.

vLLM 0.32 has no backend that takes a custom mask (and removed cascade
attention). Fork/merge decoding needs none: a branch is a causal request
with shifted positions. The rows that do (a prompt that holds Parallel
blocks, a merged request recomputed after preemption, sequential decoding)
arrive as ``attn_metadata.multiverse_masks``
(:class:`~vllm_multiverse.kernels.masked_attention.MaskedBatch`, set by the
runner). Each backend here is vLLM's own with its impl subclassed: on CPU
the Multiverse kernel computes a step with masked rows alone (every row,
over the paged cache: the KV write has already run); elsewhere the stock
kernel runs for the whole batch, then the masked rows are recomputed and
overwrite their output. Batches with nothing to mask are vLLM's kernel alone.

The subclasses replace vLLM's entries through ``register_backend`` (vLLM's
custom-backend registration), in the worker of a Multiverse engine only,
before its model is built; ``get_name()`` stays vLLM's. A class is made the
first time vLLM resolves its path, so a backend whose library is missing
(FlashInfer) is imported only if it is chosen.

Routes for the masked rows: on CPU, the Multiverse kernel
(``csrc/cpu/masked_attention.cpp``) computes the whole step in place of
vLLM's kernel (causal rows included, so nothing is computed twice); SDPA per
row over the gathered K/V where that kernel is not built (and on CUDA with
``--multiverse-masked-attention sdpa``); FlashInfer's masked paged prefill
(CUDA default where FlashInfer is installed).
"""

from __future__ import annotations

import importlib

from vllm_multiverse.kernels import cpu_masked
from vllm_multiverse.kernels.masked_attention import (
    FlashInferMaskedPrefill,
    MaskedBatch,
    flashinfer_layout,
    gather_logical,
    sdpa_masked_rows,
)

# vLLM backend (its AttentionBackendEnum name) -> module, backend class, impl class.
BACKENDS = {
    "CPU_ATTN": ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackend", "CPUAttentionBackendImpl"),
    "FLASH_ATTN": ("vllm.v1.attention.backends.flash_attn", "FlashAttentionBackend", "FlashAttentionImpl"),
    "FLASHINFER": ("vllm.v1.attention.backends.flashinfer", "FlashInferBackend", "FlashInferImpl"),
    "TRITON_ATTN": ("vllm.v1.attention.backends.triton_attn", "TritonAttentionBackend", "TritonAttentionImpl"),
}
CUDA_BACKENDS = ("FLASH_ATTN", "FLASHINFER", "TRITON_ATTN")
_PREFIX = "Multiverse_"

# One FlashInfer workspace per (device, layout) in this process.
_FLASHINFER: dict = {}


class MaskedRowsImpl:
    """Mixin for a vLLM attention impl: its forward, then the masked rows."""

    # "sdpa" or "flashinfer"; set for the process by register().
    route = "sdpa"

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        batch = getattr(attn_metadata, "multiverse_masks", None)
        if batch and self._cpu_kernel_step(batch, query, kv_cache, attn_metadata, output):
            return output
        out = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        if batch:
            self.recompute_masked_rows(batch, query, kv_cache, output)
        return out

    def _cpu_kernel_step(self, batch: MaskedBatch, query, kv_cache, md, output) -> bool:
        """On CPU, a step with masked rows is the Multiverse kernel's alone:
        every request of the batch (a causal row is one without rectangles)
        in place over the cache, so no row is computed twice. vLLM wrote the
        step's K/V before ``forward`` (``do_kv_cache_update``). False where
        the kernel is not built or does not take this layer."""
        if kv_cache.device.type != "cpu" or cpu_masked.cpu_kernel() is None:
            return False
        plain = (
            self.attn_type == "decoder"
            and self.sliding_window == -1
            and self.alibi_slopes is None
            and not self.logits_soft_cap
            and self.sinks is None
            and self.kv_cache_dtype == "auto"
        )
        if not plain or not cpu_masked.kernel_supports(query, kv_cache):
            return False
        n, qsl = md.num_actual_tokens, md.query_start_loc
        r = len(qsl) - 1
        cpu_masked.attend(
            query[:n],
            kv_cache,
            output[:n],
            qsl[:-1],
            qsl[1:] - qsl[:-1],
            md.seq_lens[:r],
            md.block_table[:r],
            batch.request_rects(qsl.numpy()),
            self.scale,
        )
        return True

    def recompute_masked_rows(self, batch: MaskedBatch, query, kv_cache, output) -> None:
        if kv_cache.device.type == "cpu":
            from vllm_multiverse.vllm032.cpu.kv_layout import gather_kv

            sdpa_masked_rows(batch, query, kv_cache, output, self.scale, gather_kv)
        elif self.route == "sdpa":
            sdpa_masked_rows(batch, query, kv_cache, output, self.scale, gather_logical)
        else:
            self._flashinfer(batch, query, kv_cache).run(batch, query, kv_cache, output)

    def _flashinfer(self, batch: MaskedBatch, query, kv_cache) -> FlashInferMaskedPrefill:
        layout = flashinfer_layout(kv_cache)
        shape = (self.num_heads, self.num_kv_heads, self.head_size, query.dtype, kv_cache.dtype, self.scale)

        def plan() -> FlashInferMaskedPrefill:
            key = (str(kv_cache.device), layout)
            prefill = _FLASHINFER.get(key)
            if prefill is None:
                prefill = _FLASHINFER[key] = FlashInferMaskedPrefill(kv_cache.device, layout)
            prefill.plan(batch, *shape)
            return prefill

        # Planned once per step for all layers of the same shape.
        return batch.cached(("flashinfer", layout, shape), plan)


def register(platform_is_cpu: bool, route: str) -> None:
    """Point vLLM's backend entries at the Multiverse subclasses, for
    every model this process builds from now on."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    MaskedRowsImpl.route = route
    if platform_is_cpu:
        cpu_masked.cpu_kernel()  # built or loaded at start-up, not in a request's first masked step
    for name in ("CPU_ATTN",) if platform_is_cpu else CUDA_BACKENDS:
        register_backend(AttentionBackendEnum[name], f"{__name__}.{_PREFIX}{name}")


_made: dict[str, type] = {}


def __getattr__(attr: str):
    name = attr.removeprefix(_PREFIX)
    if attr == name or name not in BACKENDS:
        raise AttributeError(attr)
    if name not in _made:
        module, backend_name, impl_name = BACKENDS[name]
        mod = importlib.import_module(module)
        impl = type(f"Multiverse{impl_name}", (MaskedRowsImpl, getattr(mod, impl_name)), {})
        backend = getattr(mod, backend_name)
        _made[name] = type(
            f"Multiverse{backend_name}", (backend,), {"get_impl_cls": staticmethod(lambda: impl), "__module__": __name__}
        )
        impl.__module__ = __name__
    return _made[name]
