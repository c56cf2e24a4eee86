"""Every place vllm-multiverse touches vLLM internals, pinned to vLLM 0.32.0.

- ``validate.py``: what the engine refuses at start-up (features it does not
  handle exactly), ``per_request.py``: what it refuses per request (a 400);
- ``wiring.py``: the engine settings Multiverse decoding needs;
- ``kv.py``: the block-pool operations of forks and merges;
- ``scheduler.py``: the V1 scheduler hooks, ``outputs.py``: the outputs they emit;
- ``runner.py``: the V1 model-runner hooks (positions, masks, KV copies),
  the same on CPU and CUDA; ``attention.py``: vLLM's backends with the
  masked rows;
- ``cpu/``: the CPU worker and KV layout; ``cuda/``: the CUDA worker;
- ``metrics.py``: the stat-logger carrier for the ``multiverse:*`` counters
  (Prometheus, or Ray's metrics inside Ray Serve).

The Multiverse policy itself (:mod:`vllm_multiverse.tree`) and the structure
rule know nothing of vLLM. A different vLLM fails at start with a clear
message instead of corrupting KV silently; porting to a new release starts
here.
"""

from __future__ import annotations

SUPPORTED_VLLM = "0.32.0"
# Ray Serve LLM releases whose vLLM engine code works with SUPPORTED_VLLM
# (Ray 2.60's imports FrontendArgs from vllm.entrypoints.launchers, which
# vLLM 0.33 moved).
SUPPORTED_RAY = ("2.60.",)


def check_vllm_version() -> None:
    import vllm

    version = vllm.__version__.split("+")[0]
    if version != SUPPORTED_VLLM:
        raise RuntimeError(
            f"vllm-multiverse's engine supports vLLM {SUPPORTED_VLLM} only; found "
            f"vLLM {vllm.__version__}. Install vllm{'-cpu' if 'cpu' in vllm.__version__ else ''}"
            f"=={SUPPORTED_VLLM}, or run without Multiverse decoding (--no-multiverse-enabled, "
            "or VLLM_PLUGINS excluding 'multiverse')."
        )


def check_ray_serve() -> None:
    """Inside a Ray process: a Ray whose Serve LLM pairs with this vLLM."""
    import sys

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    if not ray.__version__.startswith(SUPPORTED_RAY):
        raise RuntimeError(
            f"vllm-multiverse runs under Ray Serve LLM with ray[serve] {'/'.join(v + 'x' for v in SUPPORTED_RAY)} "
            f"and vLLM {SUPPORTED_VLLM}; found Ray {ray.__version__}. Install \"vllm-multiverse[ray]\" "
            "(ray[serve]==2.60.0; not ray[llm], which pins another vLLM)."
        )
