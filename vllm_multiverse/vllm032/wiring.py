"""Which engines run Multiverse decoding, and the vLLM settings that means.

:func:`create_engine_config` is vLLM's ``EngineArgs.create_engine_config``
with the plugin around it (``patches.py``), in every process that builds an
engine config: an engine for a Multiverse model gets the Multiverse scheduler
and worker once :mod:`.validate` has refused what it cannot serve. The worker
points vLLM's attention backends at the masked-rows subclasses
(:mod:`.attention`) in its own process. Every other engine is left exactly as
vLLM builds it.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from vllm_multiverse.config import ADDITIONAL_CONFIG_KEY, MultiverseConfig
from vllm_multiverse.model_config import (
    ModelDeclaration,
    PartialTags,
    derive_declaration,
    describe,
    read_model_declaration,
)
from vllm_multiverse.vllm032 import check_ray_serve, check_vllm_version, patches, validate
from vllm_multiverse.vllm032.log import init_logger

if TYPE_CHECKING:
    from vllm.config import ModelConfig, VllmConfig
    from vllm.engine.arg_utils import EngineArgs

logger = init_logger(__name__)

SCHEDULER_CLS = "vllm_multiverse.vllm032.scheduler.MultiverseScheduler"
# Platform -> (vLLM's worker, the Multiverse worker).
WORKERS = {
    "cpu": ("vllm.v1.worker.cpu_worker.CPUWorker", "vllm_multiverse.vllm032.cpu.worker.MultiverseCPUWorker"),
    "cuda": ("vllm.v1.worker.gpu_worker.Worker", "vllm_multiverse.vllm032.cuda.worker.MultiverseGPUWorker"),
}
V2_ENV = "VLLM_USE_V2_MODEL_RUNNER"
# Whether this process set V2_ENV for a Multiverse engine (the user had not).
_set_v1_env = False


def platform_name() -> str:
    from vllm.platforms import current_platform

    return (
        "cpu" if current_platform.is_cpu() else "cuda" if current_platform.is_cuda() else current_platform.device_name
    )


def create_engine_config(
    original: Callable[..., VllmConfig], self: EngineArgs, *args: Any, **kwargs: Any
) -> VllmConfig:
    """``EngineArgs.create_engine_config`` (patches.py)."""
    _forget_v1_runner()
    config = original(self, *args, **kwargs)
    if wants_v1_runner(config):
        # Refused with the reason and the way out before vLLM's V1 runner
        # refuses what it lacks (prefill context parallelism) in its words.
        validate.validate(config, self, runner_chosen=False)
        _choose_v1_runner()
        config = original(self, *args, **kwargs)
    configure_engine(config, self)
    return config


def multiverse_declaration(vllm_config: VllmConfig, cfg: MultiverseConfig) -> ModelDeclaration | None:
    """The model's Multiverse declaration, or None for a model served as
    stock vLLM would."""
    if cfg.enabled is False:
        return None
    model_config = vllm_config.model_config
    found = read_model_declaration(model_config.hf_config) or _derive(model_config, cfg.enabled)
    if found is None and cfg.enabled:
        raise ValueError(
            f"Multiverse decoding was asked for, but {model_config.model} is not a Multiverse model: no "
            "config.json['multiverse'] entry and no Multiverse tags in its tokenizer"
        )
    return found


def wants_v1_runner(vllm_config: VllmConfig) -> bool:
    """A Multiverse engine on CUDA whose config chose Model Runner V2 by
    default, not by the user's ``VLLM_USE_V2_MODEL_RUNNER=1``: it is built
    again with the V1 runner while vLLM has one (cuda/worker.py says why)."""
    if platform_name() != "cuda" or not vllm_config.use_v2_model_runner:
        return False
    if os.environ.get(V2_ENV, "").strip().lower() in ("1", "true"):
        return False
    return multiverse_declaration(vllm_config, MultiverseConfig.of(vllm_config)) is not None


def _choose_v1_runner() -> None:
    """The runner choice shapes the whole config (CUDA graphs, scheduling),
    so it is made before vLLM builds the config again, and in the
    environment the engine's processes inherit."""
    global _set_v1_env
    if V2_ENV not in os.environ:
        os.environ[V2_ENV] = "0"
        _set_v1_env = True
    logger.info(
        "Multiverse: the V1 model runner on CUDA (%s=0: vLLM 0.32 has it; %s=1 chooses Model Runner V2; "
        "docs/attention.md says why)",
        V2_ENV,
        V2_ENV,
    )


def _forget_v1_runner() -> None:
    """A later engine of this process decides afresh: the earlier one's
    processes have inherited the switch already, and a stock engine must not."""
    global _set_v1_env
    if _set_v1_env:
        os.environ.pop(V2_ENV, None)
        _set_v1_env = False


def configure_engine(vllm_config: VllmConfig, engine_args: EngineArgs | None = None) -> bool:
    """Turn Multiverse decoding on for this engine if it should be; True if
    on. ``engine_args``: what the user asked for, where known."""
    cfg = MultiverseConfig.of(vllm_config)
    if multiverse_declaration(vllm_config, cfg) is None:
        return False
    model_config = vllm_config.model_config
    check_vllm_version()
    check_ray_serve()
    validate.validate(vllm_config, engine_args)
    _drop_history_defaults(model_config)
    platform = platform_name()
    sched, par = vllm_config.scheduler_config, vllm_config.parallel_config
    validate.check_classes(sched.scheduler_cls, par.worker_cls, SCHEDULER_CLS, ("auto", *WORKERS[platform]))
    sched.scheduler_cls = SCHEDULER_CLS
    par.worker_cls = WORKERS[platform][1]
    flashinfer = importlib.util.find_spec("flashinfer") is not None
    validate.check_masked_route(cfg.masked_attention, platform, flashinfer)
    if platform == "cuda":
        # The worker settles the route when FlashInfer's module is built or
        # loaded (cuda/worker.py).
        logger.info(
            "Multiverse: %s; steps with masked rows (prompts holding Parallel blocks, recompute "
            "after preemption, sequential decoding) through %s, without full CUDA graphs",
            "Model Runner V2" if vllm_config.use_v2_model_runner else "V1 model runner",
            "FlashInfer's masked paged prefill, built or loaded while the model loads (SDPA where it cannot be)"
            if cfg.masked_attention != "sdpa" and flashinfer
            else "SDPA over the gathered KV",
        )
    if sched.async_scheduling:
        sched.async_scheduling = False
        logger.info("Multiverse: async scheduling off (a fork is decided on the tokens of the step just run)")
    if not vllm_config.cache_config.enable_prefix_caching:
        # Branches share their parent's blocks through the prefix-cache
        # machinery; what the user turned off is reading the cache.
        cfg = replace(cfg, prefix_caching=False)
        vllm_config.cache_config.enable_prefix_caching = True
        logger.info(
            "Multiverse: --no-enable-prefix-caching means that no request reads the prefix cache; "
            "vLLM's prefix-cache machinery stays on (branches share their parent's KV blocks through it)"
        )
    # enabled=True marks the engine as on for the API server's stat logger
    # and the per-request checks (config.turned_on).
    cfg = replace(cfg, enabled=True)
    vllm_config.additional_config = {**(vllm_config.additional_config or {}), ADDITIONAL_CONFIG_KEY: cfg.to_dict()}
    logger.info("Multiverse decoding on for %s (%s)", model_config.model, cfg)
    return True


def _derive(model_config: ModelConfig, asked: bool | None) -> ModelDeclaration | None:
    """The declaration of a checkpoint that has none, from its tokenizer
    (stored on the HF config, where a config.json entry would be)."""
    from transformers import AutoTokenizer

    if model_config.skip_tokenizer_init:
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_config.tokenizer,
            revision=model_config.tokenizer_revision,
            trust_remote_code=model_config.trust_remote_code,
        )
    except Exception as e:  # not a Hugging Face tokenizer: then not the authors' checkpoint either
        logger.debug("Multiverse: no Hugging Face tokenizer for %s (%s)", model_config.model, e)
        return None
    try:
        entry = derive_declaration(tokenizer)
    except PartialTags as e:
        if asked:
            raise ValueError(f"Multiverse decoding was asked for, but for {model_config.model} {e}") from e
        logger.warning("Multiverse decoding off for %s: %s", model_config.model, e)
        return None
    if entry is None:
        return None
    patches.store_declaration(model_config.hf_config, entry)
    logger.info(
        "Multiverse: %s declares nothing; derived from its tokenizer: %s (`vllm-multiverse declare` prints "
        "it, --write stores it; --multiverse-positions changes the convention)",
        model_config.model,
        describe(entry),
    )
    return read_model_declaration(model_config.hf_config)


# Sampling defaults that depend on earlier output tokens (per_request.py).
_HISTORY_DEFAULTS = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}


def _drop_history_defaults(model_config: ModelConfig) -> None:
    """A checkpoint's generation_config.json may ask for penalties (Qwen2.5's
    does): they are not applied by default, as the authors' engine did not,
    rather than every request being refused."""
    defaults = model_config.get_diff_sampling_param()
    for name, neutral in _HISTORY_DEFAULTS.items():
        value = defaults.get(name)
        if value is None or value == neutral:
            continue
        validate.check_history_override(name, value, model_config.override_generation_config)
        model_config.override_generation_config[name] = neutral
        logger.info(
            "Multiverse: the model's generation config sets %s=%s; not applied by default (it depends on the "
            "earlier output tokens, which a Path decoded in parallel does not have)",
            name,
            value,
        )
