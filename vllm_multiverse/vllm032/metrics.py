"""Multiverse counters at vLLM's ``/metrics``.

The scheduler counts forks, merges, Paths per fork, fallbacks and tokens
decoded in parallel in the engine-core process; Prometheus is served by the
API server. vLLM 0.32.0 carries only ``SchedulerStats`` from one to the
other and has no field for a plugin's own figures: the scheduler's running
totals ride on it (``patches.attach_totals``, patch 10), and
:class:`MultiverseStatLogger`, loaded by vLLM from the
``vllm.stat_logger_plugins`` entry point and called before vLLM's own
loggers, takes them off again (``patches.take_totals``) and exports them.

Totals, not deltas, travel: a step whose stats are not delivered loses
nothing, and the logger increments by the difference.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, Counter, Histogram
from vllm.v1.metrics.loggers import AggregateStatLoggerBase

from vllm_multiverse.config import turned_on
from vllm_multiverse.vllm032.patches import take_totals

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.metrics.stats import IterationStats, MultiModalCacheStats, SchedulerStats

PATHS_PREFIX = "paths_per_fork/"
PATHS_BUCKETS = (2, 3, 4, 5, 6, 8, 12, 16, 32, 64)


def scheduler_totals(stats: Mapping[str, int], paths_per_fork: Mapping[int, int]) -> dict[str, int]:
    totals = dict(stats)
    totals.update({f"{PATHS_PREFIX}{n}": count for n, count in paths_per_fork.items()})
    return totals


def _metric_classes() -> tuple[type, type]:
    """prometheus_client's Counter and Histogram, or inside a Ray process
    (a Ray Serve replica) vLLM's wrappers of Ray's metrics with the same API,
    which Ray exports (``ray start --metrics-export-port``) as
    ``ray_multiverse_*``, as Ray Serve LLM does for ``vllm:*``."""
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        from vllm.v1.metrics.ray_wrappers import RayCounterWrapper, RayHistogramWrapper

        return RayCounterWrapper, RayHistogramWrapper
    return Counter, Histogram


class MultiverseStatLogger(AggregateStatLoggerBase):
    """Exports the scheduler's totals as ``multiverse:*`` metrics.

    The names are not ``vllm:*`` because vLLM's Prometheus logger, built
    after this one, unregisters every ``vllm:*`` collector it finds.
    """

    def __init__(self, vllm_config: VllmConfig, engine_indexes: list[int] | None = None) -> None:
        self.engine_indexes = engine_indexes or [0]
        # configure_engine marks an engine it turned on; others export nothing.
        self.enabled = turned_on(vllm_config)
        self._last: dict[int, dict[str, int]] = {}
        if not self.enabled:
            return
        counter, histogram = _metric_classes()
        if counter is Counter:
            _unregister_ours()
        labels = ["model_name", "engine"]
        self._model_name = vllm_config.model_config.served_model_name
        self.forks = counter(
            "multiverse:forks", "Parallel blocks split into branch requests (fallbacks included).", labels
        )
        self.merges = counter("multiverse:merges", "Parallel blocks merged back into their request.", labels)
        self.paths_per_fork = histogram(
            "multiverse:paths_per_fork", "Paths of each forked Parallel block.", labels, buckets=list(PATHS_BUCKETS)
        )
        self.fallbacks = counter(
            "multiverse:fallbacks",
            "Forks whose Paths ran one at a time: caps (--multiverse-max-*) or kv_cache (KV exhausted).",
            [*labels, "reason"],
        )
        self.parallel_tokens = counter(
            "multiverse:parallel_tokens", "Tokens sampled by branches decoding beside their siblings.", labels
        )
        for idx in self.engine_indexes:  # every series exists from the start, at 0
            engine = (self._model_name, str(idx))
            for metric in (self.forks, self.merges, self.paths_per_fork, self.parallel_tokens):
                metric.labels(*engine)
            for reason in ("caps", "kv_cache"):
                self.fallbacks.labels(*engine, reason)

    def record(
        self,
        scheduler_stats: SchedulerStats | None,
        iteration_stats: IterationStats | None,
        mm_cache_stats: MultiModalCacheStats | None = None,
        engine_idx: int = 0,
    ) -> None:
        if scheduler_stats is None:
            return
        totals = take_totals(scheduler_stats)
        if not totals or not self.enabled:
            return
        last = self._last.get(engine_idx, {})
        self._last[engine_idx] = totals
        delta = {k: v - last.get(k, 0) for k, v in totals.items() if v > last.get(k, 0)}
        if not delta:
            return
        engine = (self._model_name, str(engine_idx))
        self.forks.labels(*engine).inc(delta.get("forks", 0))
        self.merges.labels(*engine).inc(delta.get("merges", 0))
        self.fallbacks.labels(*engine, "caps").inc(delta.get("fallbacks", 0))
        self.fallbacks.labels(*engine, "kv_cache").inc(delta.get("rollbacks", 0))
        self.parallel_tokens.labels(*engine).inc(delta.get("parallel_tokens", 0))
        for key, count in delta.items():
            if key.startswith(PATHS_PREFIX):
                for _ in range(count):
                    self.paths_per_fork.labels(*engine).observe(int(key[len(PATHS_PREFIX) :]))

    def log_engine_initialized(self) -> None:
        pass


def _unregister_ours() -> None:
    """A second engine in one process (tests, notebooks) builds the metrics again."""
    for collector in list(REGISTRY._collector_to_names):
        if getattr(collector, "_name", "").startswith("multiverse:"):
            REGISTRY.unregister(collector)
