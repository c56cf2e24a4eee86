"""Shared pieces of the engine tests: held-out prompts and reference outputs."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import conftest
from conftest import TINY_MODEL


@functools.lru_cache(maxsize=1)
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_MODEL)


@functools.lru_cache(maxsize=1)
def reference():
    import torch

    from vllm_multiverse.reference import ReferenceDecoder

    torch.set_num_threads(2)
    return ReferenceDecoder.from_pretrained(TINY_MODEL)


def held_out_prompts(n: int) -> list[list[int]]:
    from tiny_model.train import chat_prompt, held_out_tasks

    tok = tokenizer()
    return [tok.encode(chat_prompt(tok, t.prompt()), add_special_tokens=False) for t in held_out_tasks(n)]


def user_texts(n: int) -> list[str]:
    """The first ``n`` held-out task prompts, as a user writes them."""
    from tiny_model.train import held_out_tasks

    return [t.prompt() for t in held_out_tasks(max(16, n))[:n]]


def openai_client(base: str, timeout: float = 600):
    from openai import OpenAI

    return OpenAI(base_url=base + "/v1", api_key="none", timeout=timeout)


@functools.cache
def _reference_key() -> str:
    import hashlib

    from vllm_multiverse import reference as module

    h = hashlib.sha256()
    for path in (TINY_MODEL / "model.safetensors", TINY_MODEL / "config.json", Path(module.__file__)):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


@functools.cache
def reference_output(prompt: tuple[int, ...], max_tokens: int) -> tuple[list[int], str]:
    # Shared by the V1 and V2 sessions of one ``make test`` (conftest),
    # under a key of the model's weights and the reference's code.
    cache = conftest.REFERENCE_CACHE
    key = f"multiverse/reference/{_reference_key()}/{hash_tokens(prompt)}-{max_tokens}"
    if cache is not None and (hit := cache.get(key, None)) is not None:
        return hit[0], hit[1]
    out = reference().generate(list(prompt), max_tokens=max_tokens)
    if cache is not None:
        cache.set(key, [out.token_ids, out.finish_reason])
    return out.token_ids, out.finish_reason


def hash_tokens(tokens: tuple[int, ...]) -> str:
    import hashlib

    return hashlib.sha256(repr(tokens).encode()).hexdigest()[:24]


MAX_TOKENS = 1500


def scheduler(llm):
    """The engine core's scheduler (the engine core must run in-process)."""
    return llm.llm_engine.engine_core.engine_core.scheduler


def greedy(max_tokens=MAX_TOKENS, **kw):
    from vllm import SamplingParams

    return SamplingParams(**({"temperature": 0.0, "max_tokens": max_tokens, "skip_special_tokens": False} | kw))


@contextlib.contextmanager
def final_tokens(sched):
    """Client request id -> its output tokens as the engine's own request
    holds them when it is freed (what the client must have been sent)."""
    from vllm_multiverse.tree import is_branch

    final: dict[str, list[int]] = {}
    free = sched._free_request

    def record(request, *args, **kwargs):
        if not is_branch(request.request_id):
            final[request.request_id] = list(request.output_token_ids)
        return free(request, *args, **kwargs)

    sched._free_request = record
    try:
        yield final
    finally:
        del sched._free_request


def step_until(llm, predicate, limit=3000):
    engine = llm.llm_engine
    outs = []
    for _ in range(limit):
        outs += engine.step()
        if predicate():
            return outs
    raise AssertionError("condition not reached")
