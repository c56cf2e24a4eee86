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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm_multiverse.tree.fork import Fork


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


@dataclass(frozen=True)
class StopRule:
    budget: int  # tokens the parent may still append (max_tokens and max_model_len)
    stop_ids: frozenset[int]  # EOS included unless ignored
    eos: int | None = None

    @classmethod
    def of(cls, budget: int, stop_ids: Iterable[int], eos: int | None, ignore_eos: bool) -> StopRule:
        stops = set(stop_ids)
        if eos is not None and not ignore_eos:
            stops.add(eos)
        return cls(budget, frozenset(stops), eos)


@dataclass(frozen=True)
class Cut:
    tokens: list[int]
    written: bytes  # 1 where the engine wrote the token
    rows: list | None  # logprob rows in text order (None where written), or None
    end: End | None  # None: the text goes on after the Conclusion header


def text_in_order(fork: Fork, rule: StopRule, conclusion_header: Sequence[int]) -> Cut | None:
    """The fork's text, or None while a Path that has not ended could still
    be part of it."""
    text: list[int] = []
    written = bytearray()
    rows: list | None = []

    def cut(end: End | None) -> Cut:
        return Cut(text, bytes(written), rows, end)

    for k in range(fork.num_paths):
        res = fork.results.get(k)
        if res is None:
            return None
        if rows is not None and res.rows is not None:
            rows.extend(res.rows)
        else:
            rows = None
        for tok, w in zip(res.tokens, res.written):
            text.append(tok)
            written.append(w)
            if not w and tok in rule.stop_ids:
                if rows is not None:
                    del rows[len(text) :]
                return cut(End(Finish.STOPPED, None if tok == rule.eos else tok))
            if len(text) >= rule.budget:
                if rows is not None:
                    del rows[len(text) :]
                return cut(End(Finish.LENGTH))
        if res.end is not None:
            return cut(res.end)
    for tok in conclusion_header:
        text.append(tok)
        written.append(1)
        if rows is not None:
            rows.append(None)
        if len(text) >= rule.budget:
            return cut(End(Finish.LENGTH))
    return cut(None)
