"""What a Multiverse engine refuses per request: a 400 with the reason,
never a hang or a silently different answer.

The check runs in vLLM's ``InputProcessor.process_inputs`` (the API server,
``LLM`` and ``AsyncLLM`` all build requests there), after the model's
generation-config defaults are applied, so a default that comes from the
checkpoint is refused like one the client sent. It also tags each request
with its client request, which ``n > 1`` siblings share (the engine's caps
are per client request).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vllm_multiverse.config import turned_on

if TYPE_CHECKING:
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.request import Request

CLIENT_ARG = "multiverse_client"  # SamplingParams.extra_args: the client request

WAY_OUT = "Send it to an engine started with --no-multiverse-enabled."


def refusal(params: SamplingParams | None, resumable: bool) -> str | None:
    """Why a request cannot be served exactly by a Multiverse engine, or None."""
    if resumable:
        return "streaming-input (resumable) requests: a Path cannot take new input while it decodes."
    if params.structured_outputs is not None:
        return (
            "structured outputs: the grammar would have to accept the Path and Conclusion headers "
            "the engine writes, and each Path is decoded apart from the text before it."
        )
    # Each of these reads the request's earlier output tokens, which for a
    # Path are its own, not the sequential text before it.
    history = {
        "repetition_penalty": params.repetition_penalty != 1.0,
        "presence_penalty": params.presence_penalty != 0.0,
        "frequency_penalty": params.frequency_penalty != 0.0,
        "min_tokens": params.min_tokens > 0,
        "bad_words": bool(params.bad_words),
        "repetition_detection": params.repetition_detection is not None,
        "thinking_token_budget": params.thinking_token_budget is not None,
        "trace_decode_token_ids": bool(params.trace_decode_token_ids),
    }
    used = [name for name, on in history.items() if on]
    if used:
        return (
            f"{', '.join(used)}: they depend on the earlier output tokens, which a Path decoded in "
            "parallel does not have (if a default comes from the model's generation_config.json, "
            "start with --generation-config vllm)."
        )
    return None


def process_inputs(
    original: Callable[..., Request],
    self: InputProcessor,
    request_id: str,
    prompt: Any,
    params: Any,
    *args: Any,
    **kwargs: Any,
) -> Request:
    """``InputProcessor.process_inputs`` (patches.py): the request as vLLM
    builds it, refused with a 400 where it cannot be served exactly."""
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams

    request = original(self, request_id, prompt, params, *args, **kwargs)
    sp = request.sampling_params
    if not isinstance(sp, SamplingParams) or not turned_on(self.vllm_config):
        return request
    why = refusal(sp, bool(request.resumable))
    if why is not None:
        raise VLLMValidationError(f"This Multiverse engine does not support {why} {WAY_OUT}")
    sp.extra_args = {**(sp.extra_args or {}), CLIENT_ARG: uuid.uuid4().hex}
    return request


async def add_streaming_input_request(original: Callable[..., Any], self: AsyncLLM, *args: Any, **kwargs: Any) -> Any:
    """``AsyncLLM._add_streaming_input_request`` (patches.py): refused before
    the input stream is read, not inside its task."""
    from vllm.exceptions import VLLMValidationError

    if turned_on(self.vllm_config):
        raise VLLMValidationError(f"This Multiverse engine does not support {refusal(None, True)} {WAY_OUT}")
    return await original(self, *args, **kwargs)
