"""The text of a fork in order, cut where sequential decoding would end it.

Sequential decoding writes Path 1, then Path 2, ..., then the Conclusion
header, in one sequence, and stops at the first sampled stop token, at the
length limits, or where a Path stopped for any other reason. Parallel
branches decode the Paths independently; this module lays their texts out
in that order and applies the same stops, so the merged text is what the
sequential layer gives.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vllm_multiverse.tree.blocks import Block


class Finish(enum.Enum):
    STOPPED = "stopped"  # EOS or a stop token
    LENGTH = "length"  # max_tokens or max_model_len
    REPETITION = "repetition"
    ERROR = "error"
    ABORTED = "aborted"


@dataclass(frozen=True)
class End:
    """How a branch ended when it was not at its Path's tail."""

    finish: Finish
    stop_reason: int | str | None = None


@dataclass(eq=False)
class BranchResult:
    """A Path's text as its branch ended."""

    request_id: str
    tokens: list[int]  # the Path's text (Path 1's with the shared lead)
    written: bytes  # 1 where the engine wrote tokens[i]
    blocks: list[Block]  # its KV, still referenced: the tree's stash
    end: End | None  # None: ended at its tail; else where and why the text ends
    logprobs: list | None  # per token (None where written), if asked for


@dataclass(frozen=True)
class StopRule:
    budget: int  # tokens the parent may still append (max_tokens and max_model_len)
    stop_ids: frozenset[int]  # EOS included unless ignored
    eos: int | None = None


@dataclass(frozen=True)
class Cut:
    tokens: list[int]
    written: bytes  # 1 where the engine wrote the token
    logprobs: list | None  # per token in text order (None where written), or None
    end: End | None  # None: the text goes on after the Conclusion header


def text_in_order(
    results: Mapping[int, BranchResult], num_paths: int, rule: StopRule, conclusion_header: Sequence[int]
) -> Cut | None:
    """A fork's text from its Paths' ``results``, or None while a Path that
    has not ended could still be part of it."""
    text: list[int] = []
    written = bytearray()
    logprobs: list | None = []

    def cut(end: End | None) -> Cut:
        if logprobs is not None:
            del logprobs[len(text) :]
        return Cut(text, bytes(written), logprobs, end)

    for k in range(num_paths):
        res = results.get(k)
        if res is None:
            return None
        if logprobs is not None and res.logprobs is not None:
            logprobs.extend(res.logprobs)
        else:
            logprobs = None
        for tok, w in zip(res.tokens, res.written):
            text.append(tok)
            written.append(w)
            if not w and tok in rule.stop_ids:
                return cut(End(Finish.STOPPED, None if tok == rule.eos else tok))
            if len(text) >= rule.budget:
                return cut(End(Finish.LENGTH))
        if res.end is not None:
            return cut(res.end)
    for tok in conclusion_header:
        text.append(tok)
        written.append(1)
        if logprobs is not None:
            logprobs.append(None)
        if len(text) >= rule.budget:
            return cut(End(Finish.LENGTH))
    return cut(None)
