"""What the scheduler hooks hand to vLLM's output processor.

Sample logprobs of merged text are the branches' own, in text order: per
token ``(token ids, logprobs, rank)`` as vLLM's sampler makes them. Tokens
the engine writes (Path headers, the Conclusion header) were never sampled;
theirs hold only that token, with logprob 0.0: the engine put it there with
certainty (vLLM ranks the entries by column, so the rank it reports for that
single entry is the number of logprobs asked for).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from vllm.v1.engine import EngineCoreOutput
from vllm.v1.outputs import LogprobsLists

if TYPE_CHECKING:
    from vllm.v1.metrics.stats import PrefillStats
    from vllm.v1.request import Request

# One token's sample logprobs: (token ids, logprobs, rank of the sampled one).
TokenLogprobs = tuple[np.ndarray, np.ndarray, int]


def per_token(lists: LogprobsLists) -> list[TokenLogprobs]:
    ids, lps, ranks, _ = lists
    return [(ids[i], lps[i], int(ranks[i])) for i in range(len(ranks))]


def to_lists(tokens: Sequence[int], logprobs: Sequence[TokenLogprobs | None], num_logprobs: int) -> LogprobsLists:
    """``logprobs[i]`` is None where the engine wrote ``tokens[i]``."""
    width = next((lp[0].shape[0] for lp in logprobs if lp is not None), max(num_logprobs, 0) + 1)
    ids = np.empty((len(tokens), width), dtype=np.int32)
    lps = np.empty((len(tokens), width), dtype=np.float32)
    ranks = np.empty(len(tokens), dtype=np.int32)
    for i, (tok, lp) in enumerate(zip(tokens, logprobs)):
        if lp is None:
            ids[i], lps[i], ranks[i] = tok, 0.0, 1
        else:
            ids[i], lps[i], ranks[i] = lp
    return LogprobsLists(ids, lps, ranks)


def merged_output(
    request: Request,
    tokens: list[int],
    logprobs: Sequence[TokenLogprobs | None] | None,
    finished: bool,
    prefill_stats: PrefillStats | None,
) -> EngineCoreOutput:
    """A merge's text as new tokens of the client's request, with what vLLM's
    own outputs carry (events, trace headers, prefill stats): a request that
    forks at its prompt emits nothing before its first merge."""
    num_logprobs = request.sampling_params.logprobs
    if num_logprobs is not None and logprobs is None:
        logprobs = [None] * len(tokens)
    return EngineCoreOutput(
        request_id=request.request_id,
        new_token_ids=tokens,
        new_logprobs=None if num_logprobs is None else to_lists(tokens, logprobs, num_logprobs),
        finish_reason=request.get_finished_reason() if finished else None,
        stop_reason=request.stop_reason,
        events=request.take_events(),
        prefill_stats=prefill_stats,
        trace_headers=request.trace_headers,
        num_nans_in_logits=request.num_nans_in_logits,
    )
