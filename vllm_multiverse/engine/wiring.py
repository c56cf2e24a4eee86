"""Which engines run Multiverse decoding, and the vLLM settings that means."""

from __future__ import annotations

from dataclasses import replace

from vllm_multiverse.engine.config import ADDITIONAL_CONFIG_KEY, MultiverseConfig
from vllm_multiverse.log import init_logger
from vllm_multiverse.model_config import read_multiverse_config

logger = init_logger(__name__)

SCHEDULER_CLS = "vllm_multiverse.engine.scheduler.MultiverseScheduler"
CPU_WORKER_CLS = "vllm_multiverse.engine.worker.MultiverseCPUWorker"
_STOCK_CPU_WORKER = "vllm.v1.worker.cpu_worker.CPUWorker"


def configure_engine(vllm_config) -> bool:
    """Turn Multiverse decoding on for this engine if it should be; True if on."""
    raw = (vllm_config.additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
    cfg = MultiverseConfig.from_dict(raw)
    info = read_multiverse_config(vllm_config.model_config.hf_config)
    enabled = cfg.enabled if cfg.enabled is not None else info is not None
    if not enabled:
        return False
    if info is None:
        raise ValueError(
            f"Multiverse decoding was asked for, but {vllm_config.model_config.model} does not "
            "declare itself a Multiverse model (config.json['multiverse'])"
        )
    from vllm.platforms import current_platform

    from vllm_multiverse.engine.vllm_compat import check_vllm_version

    check_vllm_version()
    sched = vllm_config.scheduler_config
    if sched.scheduler_cls not in (None, SCHEDULER_CLS):
        raise ValueError(f"Multiverse decoding needs its own scheduler, not {sched.scheduler_cls}")
    sched.scheduler_cls = SCHEDULER_CLS
    # A fork is decided on the tokens of the step just run.
    sched.async_scheduling = False
    par = vllm_config.parallel_config
    if current_platform.is_cpu():
        if par.worker_cls not in ("auto", _STOCK_CPU_WORKER, CPU_WORKER_CLS):
            raise ValueError(f"Multiverse decoding needs its own worker, not {par.worker_cls}")
        par.worker_cls = CPU_WORKER_CLS
    else:
        raise NotImplementedError("Multiverse decoding runs on vLLM's CPU build for now")
    if not vllm_config.cache_config.enable_prefix_caching:
        # Branches share the parent's blocks through the prefix-cache API;
        # the scheduler keeps requests from reading the cache instead.
        cfg = replace(cfg, prefix_caching=False)
        vllm_config.cache_config.enable_prefix_caching = True
    # enabled=True marks the engine as on for the API server's stat logger.
    cfg = replace(cfg, enabled=True)
    vllm_config.additional_config = {**(vllm_config.additional_config or {}), ADDITIONAL_CONFIG_KEY: cfg.to_dict()}
    logger.info("Multiverse decoding on for %s", vllm_config.model_config.model)
    return True
