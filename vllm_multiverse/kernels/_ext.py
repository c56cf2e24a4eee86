"""The compiled ops of ``csrc/`` (``vllm_multiverse._C``), where built."""

from __future__ import annotations

import functools

import torch


@functools.cache
def _load() -> bool:
    try:
        import vllm_multiverse._C  # noqa: F401  (registers torch.ops.vllm_multiverse)
    except ImportError:
        return False
    return True


def ops():
    return torch.ops.vllm_multiverse


def has_op(name: str) -> bool:
    return _load() and hasattr(ops(), name)
