"""The plugin's loggers, under vLLM's logger tree."""

from __future__ import annotations

import logging

from vllm.logger import init_logger as _vllm_init_logger


def init_logger(name: str) -> logging.Logger:
    # vLLM configures handlers for the "vllm" logger tree only; a plugin's
    # records reach vLLM's output (and VLLM_LOGGING_LEVEL) under that tree.
    return _vllm_init_logger(f"vllm.plugins.{name}")
