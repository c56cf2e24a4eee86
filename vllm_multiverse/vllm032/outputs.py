"""What the scheduler hooks hand to vLLM's output processor.

Sample logprobs of merged text are the branches' own rows, in text order. A
row is one token's ``(token ids, logprobs, rank)`` as vLLM's sampler makes
it. Tokens the engine writes (Path headers, the Conclusion header) were never
sampled; their row holds only that token, with logprob 0.0: the engine put
it there with certainty (vLLM ranks a row's entries by column, so the rank it
reports for that single entry is the number of logprobs asked for).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from vllm.v1.engine import EngineCoreOutput
from vllm.v1.outputs import LogprobsLists

Row = tuple[np.ndarray, np.ndarray, int]


def rows_of(lists: LogprobsLists) -> list[Row]:
    ids, lps, ranks, _ = lists
    return [(ids[i], lps[i], int(ranks[i])) for i in range(len(ranks))]


def to_lists(tokens: Sequence[int], rows: Sequence[Row | None], num_logprobs: int) -> LogprobsLists:
    """``rows[i]`` is None where the engine wrote ``tokens[i]``."""
    width = next((r[0].shape[0] for r in rows if r is not None), max(num_logprobs, 0) + 1)
    ids = np.empty((len(tokens), width), dtype=np.int32)
    lps = np.empty((len(tokens), width), dtype=np.float32)
    ranks = np.empty(len(tokens), dtype=np.int32)
    for i, (tok, row) in enumerate(zip(tokens, rows)):
        if row is None:
            ids[i], lps[i], ranks[i] = tok, 0.0, 1
        else:
            ids[i], lps[i], ranks[i] = row
    return LogprobsLists(ids, lps, ranks)


def merged_output(
    request, tokens: list[int], rows: Sequence[Row | None] | None, finished: bool, prefill_stats
) -> EngineCoreOutput:
    """A merge's text as new tokens of the client's request, with what vLLM's
    own outputs carry (events, trace headers, prefill stats): a request that
    forks at its prompt emits nothing before its first merge."""
    num_logprobs = request.sampling_params.logprobs
    if num_logprobs is not None and rows is None:
        rows = [None] * len(tokens)
    return EngineCoreOutput(
        request_id=request.request_id,
        new_token_ids=tokens,
        new_logprobs=None if num_logprobs is None else to_lists(tokens, rows, num_logprobs),
        finish_reason=request.get_finished_reason() if finished else None,
        stop_reason=request.stop_reason,
        events=request.take_events(),
        prefill_stats=prefill_stats,
        trace_headers=request.trace_headers,
        num_nans_in_logits=request.num_nans_in_logits,
    )
