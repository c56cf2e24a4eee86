"""The ``multiverse`` vLLM general plugin (entry point ``vllm.general_plugins``).

vLLM calls :func:`register` in every process it starts (API server or
``LLM``, engine core, workers), so it must be idempotent and cheap. What it
installs is :mod:`.patches` (one guard there): an engine for a Multiverse
model (or one asked for with ``additional_config={"multiverse": {...}}``)
gets the Multiverse scheduler and worker (:mod:`.wiring`); every other
engine is left as it is.
"""

from __future__ import annotations

from vllm_multiverse import __version__
from vllm_multiverse.vllm032 import patches
from vllm_multiverse.vllm032.log import init_logger

logger = init_logger(__name__)


def register() -> None:
    if not patches.installed():
        patches.install()
        logger.info("vllm-multiverse %s plugin loaded", __version__)
