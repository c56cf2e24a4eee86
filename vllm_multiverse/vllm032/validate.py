"""Everything a Multiverse engine refuses at start-up, each refusal naming
the feature and the way out. Most run in the process the user started
(``vllm serve``, ``LLM``) before any worker exists (:func:`validate`); what
only the built engine shows is checked where it is built: the KV cache
layout (the scheduler), the attention layers and FlashInfer (the worker,
once the model is loaded).

The list is what the fork/merge engine does not handle exactly; everything
else vLLM does is either exact (TP, DP, LoRA, chunked prefill, prefix
caching, preemption) or refused per request (``per_request.py``).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from vllm.config import ModelConfig, VllmConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.kv_cache_interface import KVCacheConfig

WAY_OUT = "To serve this model without Multiverse decoding, pass --no-multiverse-enabled."

# Model types whose attention uses what the masked path lacks.
_ALIBI_MODEL_TYPES = {"bloom", "mpt", "jais", "baichuan"}
_SINK_MODEL_TYPES = {"gpt_oss"}


class MultiverseConfigError(ValueError):
    """A vLLM setting Multiverse decoding cannot serve exactly."""

    def __init__(self, feature: str, detail: str) -> None:
        self.feature = feature
        super().__init__(f"Multiverse decoding does not support {feature}: {detail} {WAY_OUT}")


def refuse(feature: str, detail: str) -> None:
    raise MultiverseConfigError(feature, detail)


def validate(vllm_config: VllmConfig, engine_args: EngineArgs | None = None, runner_chosen: bool = True) -> None:
    """Raise :class:`MultiverseConfigError` for the first setting the engine
    does not handle; ``engine_args`` tells what the user asked for. Before
    the model runner is chosen (``runner_chosen=False``), the engine and
    the model only."""
    _check_engine(vllm_config, engine_args)
    _check_model(vllm_config.model_config)
    if not runner_chosen:
        return
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        _check_cpu(vllm_config)
    elif current_platform.is_cuda():
        _check_cuda(vllm_config)
    else:
        refuse(
            f"the {current_platform.device_name} platform",
            "the plugin's model runner and attention hooks are built for vLLM's CPU and CUDA builds.",
        )


def _check_engine(vllm_config: VllmConfig, engine_args: EngineArgs | None) -> None:
    if vllm_config.speculative_config is not None:
        refuse("speculative decoding", "a fork is decided on every sampled token, one token per step.")
    if vllm_config.kv_transfer_config is not None:
        refuse(
            "KV connectors (disaggregated prefill, KV offloading)",
            "branch and merged KV would be saved or loaded as ordinary requests' KV.",
        )
    if getattr(vllm_config, "ec_transfer_config", None) is not None:
        refuse("encoder-cache connectors", "Multiverse decoding serves text-only models.")
    if getattr(vllm_config, "watermark_config", None) is not None:
        refuse("watermarking", "a watermark depends on the tokens before it, which differ between Paths.")
    par = vllm_config.parallel_config
    if par.pipeline_parallel_size > 1:
        refuse(
            "pipeline parallelism",
            "forks and merges need each step's output before the next step is scheduled.",
        )
    for name, flag in (("decode", "--decode-context-parallel-size"), ("prefill", "--prefill-context-parallel-size")):
        size = getattr(par, f"{name}_context_parallel_size", 1)
        if size > 1:
            refuse(
                f"{name} context parallelism ({flag} {size})",
                "it interleaves a request's KV across ranks, so the merge's KV copies and the masked rows "
                f"would read other tokens than they name; leave {flag} at 1.",
            )
    if par.enable_dbo:
        refuse(
            "dual-batch overlap (--enable-dbo)",
            "a micro-batched step carries its attention metadata per micro-batch, which the masked rows "
            "are not split by; leave --enable-dbo off.",
        )
    from vllm import envs

    if envs.VLLM_USE_RUST_FRONTEND:
        refuse(
            "the Rust frontend (VLLM_USE_RUST_FRONTEND=1)",
            "it bypasses vLLM's Python input processor, where each request is checked for what Multiverse "
            "decoding cannot serve exactly; unset it.",
        )
    unaware = _unaware_logits_processors(vllm_config.model_config.logits_processors, vllm_config.use_v2_model_runner)
    if unaware:
        refuse(
            f"custom logits processors (--logits-processors {', '.join(unaware)})",
            "they read each request's earlier output tokens, which differ between a Path and "
            "sequential decoding (a processor that reads the whole sequence, prompt included, "
            "declares it with the class attribute multiverse_aware = True).",
        )
    if engine_args is not None and getattr(engine_args, "async_scheduling", None):
        refuse("async scheduling (--async-scheduling)", "a fork is decided on the tokens of the step just run.")
    cache = vllm_config.cache_config
    if not cache.enable_prefix_caching and engine_args is not None and engine_args.enable_prefix_caching is not False:
        refuse(
            "a model for which vLLM turns prefix caching off",
            "branches share their parent's KV blocks through vLLM's prefix-cache machinery.",
        )
    if cache.cache_dtype != "auto":
        refuse(f"--kv-cache-dtype {cache.cache_dtype}", "the merge copies KV entries in the model's dtype only.")


def _unaware_logits_processors(processors: Collection[Any] | None, use_v2: bool) -> list[str]:
    """The processors, of types or "module:Class" names, that do not declare
    themselves Multiverse-aware; resolved the way vLLM loads them for the
    runner (each runner has its own processor API and loader)."""
    if not processors:
        return []
    if use_v2:
        from vllm.v1.worker.gpu.sample.logits_processor.loader import _load_v2_logitsprocs_by_fqcns as load
    else:
        from vllm.v1.sample.logits_processor import _load_logitsprocs_by_fqcns as load

    classes = load(processors)
    return [c.__qualname__ for c in classes if getattr(c, "multiverse_aware", False) is not True]


def _check_model(model_config: ModelConfig) -> None:
    if model_config.runner_type != "generate":
        refuse(f"--runner {model_config.runner_type}", "Multiverse decoding is for text generation.")
    if model_config.enable_prompt_embeds:
        refuse("prompt embeddings (--enable-prompt-embeds)", "the structure rule reads the prompt's token ids.")
    if model_config.is_multimodal_model:
        refuse("multimodal models", "Multiverse decoding serves text-only models.")
    if model_config.uses_mrope:
        refuse("M-RoPE", "Multiverse positions are one position per token.")
    if model_config.is_encoder_decoder:
        refuse("encoder-decoder models", "Multiverse decoding serves decoder-only models.")
    if model_config.is_hybrid or model_config.is_attention_free:
        refuse("hybrid or attention-free models", "the merge splices one full-attention KV cache group.")
    if model_config.use_mla:
        refuse("MLA attention", "the merge's KV copy knows the standard per-head K/V layout only.")
    hf = model_config.hf_text_config
    types = set(getattr(hf, "layer_types", None) or ())
    if model_config.get_sliding_window() is not None or types - {"full_attention"}:
        refuse(
            "sliding-window or mixed attention layers",
            "the merge splices one full-attention KV cache group.",
        )
    if getattr(hf, "attn_logit_softcapping", None):
        refuse("attention logit soft-capping", "the masked attention path has no soft-capping.")
    attn_config = getattr(hf, "attn_config", None)
    alibi = getattr(hf, "alibi", False) or getattr(hf, "position_embedding_type", None) == "alibi"
    if isinstance(attn_config, dict):
        alibi = alibi or attn_config.get("alibi", False)
    if alibi or hf.model_type in _ALIBI_MODEL_TYPES:
        refuse("ALiBi attention", "Multiverse positions are rotary positions.")
    if hf.model_type in _SINK_MODEL_TYPES:
        refuse("attention sinks", "the masked attention path has no sinks.")


def _check_cpu(vllm_config: VllmConfig) -> None:
    _check_attention_backend(vllm_config, ("CPU_ATTN",))
    model_config = vllm_config.model_config
    cache = vllm_config.cache_config
    dtype = model_config.dtype
    if dtype == torch.bfloat16 and not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        refuse("bfloat16 on this CPU", "it has no bf16 support (vLLM's CPU worker dies on it); pass --dtype float32.")
    if dtype != torch.float32:
        refuse(
            f"{str(dtype).removeprefix('torch.')} on CPU",
            "the merge's KV copy and the masked path know vLLM's CPU KV layout of float32; pass --dtype float32.",
        )
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    # The CPU attention packs each block by instruction set (vLLM's own
    # choice, made the same way here); the merge's copy knows "vec".
    isa = _get_attn_isa(dtype, cache.block_size, model_config.get_head_size(), cache.cache_dtype)
    if isa != "vec":
        refuse(
            f"the CPU KV cache layout {isa!r}",
            f"the merge's KV copy knows vLLM's 'vec' layout (x86, head size and block size multiples of 32; "
            f"here head size {model_config.get_head_size()}, block size {cache.block_size}).",
        )


def _check_cuda(vllm_config: VllmConfig) -> None:
    from vllm_multiverse.vllm032.attention import CUDA_BACKENDS

    dtype = vllm_config.model_config.dtype
    if dtype not in (torch.bfloat16, torch.float16):
        refuse(
            f"{str(dtype).removeprefix('torch.')} on CUDA",
            "the masked rows run on vLLM's FlashAttention, FlashInfer or Triton backends and FlashInfer's "
            "masked prefill, all bf16/fp16; pass --dtype bfloat16 or float16.",
        )
    _check_attention_backend(vllm_config, CUDA_BACKENDS)


def _check_attention_backend(vllm_config: VllmConfig, supported: tuple[str, ...]) -> None:
    backend = getattr(vllm_config.attention_config, "backend", None)
    if backend is not None and backend.name not in supported:
        refuse(
            f"the attention backend {backend.name} (--attention-backend)",
            f"the masked rows are recomputed for {', '.join(supported)} only here.",
        )


def check_classes(scheduler_cls: Any, worker_cls: str, ours: str, workers: Collection[str]) -> None:
    """A scheduler or worker the user chose in place of the plugin's."""
    if scheduler_cls not in (None, ours):
        refuse(f"--scheduler-cls {scheduler_cls}", "Multiverse decoding needs its own scheduler.")
    if worker_cls not in workers:
        refuse(f"--worker-cls {worker_cls}", "Multiverse decoding needs its own worker.")


def check_masked_route(requested: str, platform: str, flashinfer_installed: bool) -> None:
    """``--multiverse-masked-attention`` that cannot be had here."""
    if requested != "flashinfer":
        return
    if platform == "cpu":
        refuse("--multiverse-masked-attention flashinfer on CPU", "FlashInfer is a CUDA library.")
    if not flashinfer_installed:
        refuse(
            "--multiverse-masked-attention flashinfer", 'flashinfer-python is not installed (pip install -e ".[cuda]").'
        )


def check_flashinfer_built(why: str) -> None:
    """FlashInfer asked for by name, and its masked prefill did not build or
    run while the model loaded (the worker)."""
    refuse(
        "--multiverse-masked-attention flashinfer",
        f"FlashInfer's masked prefill did not build or run here ({why}); pass --multiverse-masked-attention sdpa.",
    )


def check_history_override(name: str, value: Any, overrides: dict[str, Any]) -> None:
    """A penalty the user set with --override-generation-config."""
    if name in overrides:
        refuse(
            f"--override-generation-config {name}={value}",
            "it depends on the earlier output tokens, which a Path decoded in parallel does not have.",
        )


def check_kv_cache_config(kv_cache_config: KVCacheConfig) -> None:
    """What vLLM built: one full-attention KV cache group (the scheduler)."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    groups = kv_cache_config.kv_cache_groups
    spec = groups[0].kv_cache_spec if len(groups) == 1 else None
    if type(spec) is not FullAttentionSpec or getattr(spec, "sliding_window", None):
        refuse(
            "this KV cache layout",
            f"the merge splices one full-attention KV cache group; vLLM built "
            f"{[type(g.kv_cache_spec).__name__ for g in groups]}.",
        )


def check_attention_layers(vllm_config: VllmConfig) -> None:
    """What start-up could only guess from the model's config, read off the
    built attention layers (the worker, once the model is loaded): a backend
    the plugin extends, and nothing the masked routes lack."""
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention import Attention

    from vllm_multiverse.vllm032.attention import MaskedRowsImpl

    for name, layer in get_layers_from_vllm_config(vllm_config, Attention).items():
        impl = layer.impl
        if not isinstance(impl, MaskedRowsImpl):
            refuse(
                f"the attention backend {type(impl).__name__}",
                f"layer {name} uses it; the masked rows are computed for vLLM's CPU_ATTN, FLASH_ATTN, "
                "FLASHINFER and TRITON_ATTN backends (pick one with --attention-backend).",
            )
        if getattr(impl, "alibi_slopes", None) is not None:
            refuse("ALiBi attention", f"layer {name} uses it.")
        if getattr(impl, "sinks", None) is not None:
            refuse("attention sinks", f"layer {name} uses them.")
        if getattr(impl, "logits_soft_cap", None):
            refuse("attention logit soft-capping", f"layer {name} uses it.")
        if getattr(impl, "sliding_window", None) not in (None, -1, (-1, -1)):
            refuse("sliding-window attention", f"layer {name} uses it.")
