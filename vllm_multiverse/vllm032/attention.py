"""vLLM 0.32.0's attention backends, plus the Multiverse mask where a step
needs one.

vLLM 0.32 has no backend that takes a custom mask (and removed cascade
attention). Fork/merge decoding needs none: a branch is a causal request
with shifted positions. The steps that do (a prompt that holds Parallel
blocks, a merged request recomputed after preemption, sequential decoding)
arrive with a :class:`~vllm_multiverse.kernels.masked_attention.MaskedBatch`
on their attention metadata (``patches.masked_batch``, set by the runner).
Each backend here is vLLM's own with its impl subclassed; steps with
nothing to mask are vLLM's kernel alone.

Routes for a step with masked rows: on CPU, the Multiverse kernel
(``csrc/cpu/masked_attention.cpp``) and on CUDA FlashInfer's masked paged
prefill compute every request of the step in place of vLLM's kernel
(causal rows included, so no row is computed twice); SDPA over the
gathered K/V overwrites the masked rows after vLLM's kernel where neither
runs (CPU without the built kernel, CUDA without a FlashInfer that builds,
or ``--multiverse-masked-attention sdpa``).

The subclasses replace vLLM's entries through ``register_backend`` (vLLM's
custom-backend registration), in the worker of a Multiverse engine only,
before its model is built; ``get_name()`` stays vLLM's. A class is made the
first time vLLM resolves its path, so a backend whose library is missing
(FlashInfer) is imported only if it is chosen.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from vllm_multiverse.kernels import cpu_masked
from vllm_multiverse.kernels.masked_attention import (
    FlashInferMaskedPrefill,
    Gather,
    MaskedBatch,
    flashinfer_layout,
    flashinfer_prefill,
    gather_logical,
    sdpa_masked_rows,
)
from vllm_multiverse.vllm032 import patches

# vLLM backend (its AttentionBackendEnum name) -> module, backend class, impl class.
BACKENDS = {
    "CPU_ATTN": ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackend", "CPUAttentionBackendImpl"),
    "FLASH_ATTN": ("vllm.v1.attention.backends.flash_attn", "FlashAttentionBackend", "FlashAttentionImpl"),
    "FLASHINFER": ("vllm.v1.attention.backends.flashinfer", "FlashInferBackend", "FlashInferImpl"),
    "TRITON_ATTN": ("vllm.v1.attention.backends.triton_attn", "TritonAttentionBackend", "TritonAttentionImpl"),
}
CUDA_BACKENDS = ("FLASH_ATTN", "FLASHINFER", "TRITON_ATTN")
_PREFIX = "Multiverse_"


class MaskedRowsImpl:
    """Mixin for a vLLM attention impl: a step with masked rows goes to the
    Multiverse route, every other step to vLLM's forward."""

    # The route of this process's steps with masked rows: "cpu" (the CPU
    # kernel), "flashinfer" (CUDA) or "sdpa"; settled by the worker, at
    # register() and, on CUDA, once FlashInfer's module is built (cuda/worker.py).
    route = "sdpa"
    # How the SDPA route reads a layer's cache: the logical view (CUDA), or
    # the CPU's packed layout (given by the CPU worker, register()).
    gather: Gather = staticmethod(gather_logical)

    def forward(
        self,
        layer: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: Any,
        output: torch.Tensor,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        batch = patches.masked_batch(attn_metadata)
        if not batch:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        if self.route != "sdpa" and self._plain() and self._whole_step(batch, query, kv_cache, attn_metadata, output):
            return output
        # SDPA recomputes the masked rows after vLLM's kernel computed the
        # whole batch: those rows cost one causal attention more
        # (docs/attention.md).
        out = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        sdpa_masked_rows(batch, query, kv_cache, output, self.scale, self.gather)
        return out

    def _plain(self) -> bool:
        """Whether this layer is what the whole-step routes compute (every
        layer of a Multiverse engine is: start-up refused the rest)."""
        return (
            self.attn_type == "decoder"
            and self.sliding_window in (None, -1, (-1, -1))
            and self.alibi_slopes is None
            and not self.logits_soft_cap
            and getattr(self, "sinks", None) is None
            and self.kv_cache_dtype == "auto"
        )

    def _whole_step(
        self, batch: MaskedBatch, query: torch.Tensor, kv_cache: torch.Tensor, md: Any, output: torch.Tensor
    ) -> bool:
        """Every request of the step through one masked kernel, in place of
        vLLM's (a causal request is a row without rectangles), so no row is
        computed twice. vLLM wrote the step's K/V before ``forward``
        (``do_kv_cache_update``). False where the CPU kernel does not take
        this layer."""
        if self.route == "cpu":
            if not cpu_masked.kernel_supports(query, kv_cache):
                return False
            qsl = md.query_start_loc
            r = len(batch.rows)
            cpu_masked.attend(
                query[: md.num_actual_tokens],
                kv_cache,
                output[: md.num_actual_tokens],
                qsl[:r],
                qsl[1 : r + 1] - qsl[:r],
                md.seq_lens[:r],
                md.block_table[:r],
                batch.request_rects(),
                self.scale,
            )
            return True
        self._flashinfer(batch, query, kv_cache).run(batch, query, kv_cache, output)
        return True

    def _flashinfer(self, batch: MaskedBatch, query: torch.Tensor, kv_cache: torch.Tensor) -> FlashInferMaskedPrefill:
        layout = flashinfer_layout(kv_cache)
        shape = (self.num_heads, self.num_kv_heads, self.head_size, query.dtype, kv_cache.dtype, self.scale)

        def plan() -> FlashInferMaskedPrefill:
            prefill = flashinfer_prefill(kv_cache.device, layout)
            prefill.plan(batch, *shape)
            return prefill

        # Planned once per step for all layers of the same shape.
        return batch.cached(("flashinfer", layout, shape), plan)


def register(platform_is_cpu: bool, gather: Gather = gather_logical) -> None:
    """Point vLLM's backend entries at the Multiverse subclasses, for
    every model this process builds from now on; ``gather``: how the SDPA
    route reads this platform's cache."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    # On CPU the kernel is built or loaded now, not in a request's first
    # masked step; CUDA settles its route once the model is loaded.
    MaskedRowsImpl.route = "cpu" if platform_is_cpu and cpu_masked.cpu_kernel() is not None else "sdpa"
    MaskedRowsImpl.gather = staticmethod(gather)
    for name in ("CPU_ATTN",) if platform_is_cpu else CUDA_BACKENDS:
        register_backend(AttentionBackendEnum[name], f"{__name__}.{_PREFIX}{name}")


_made: dict[str, type] = {}


def __getattr__(attr: str) -> type:
    name = attr.removeprefix(_PREFIX)
    if attr == name or name not in BACKENDS:
        raise AttributeError(attr)
    if name not in _made:
        module, backend_name, impl_name = BACKENDS[name]
        mod = importlib.import_module(module)
        impl = type(f"{attr}_Impl", (MaskedRowsImpl, getattr(mod, impl_name)), {"__module__": __name__})
        # Named as this module answers it: the CUDA platform hands vLLM's
        # selector ``__module__ + "." + __qualname__`` of the class, which
        # vLLM resolves again through this module's ``__getattr__``.
        _made[name] = type(
            attr,
            (getattr(mod, backend_name),),
            {"get_impl_cls": staticmethod(lambda: impl), "__module__": __name__},
        )
    return _made[name]
