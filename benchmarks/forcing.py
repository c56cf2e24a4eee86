"""Transcript replay: every sampled token forced to a given transcript's.

A request carries the transcript's answer in
``SamplingParams.extra_args`` (:func:`replay_args`); a logits processor
(``LLM(..., logits_processors=[processor_for(use_v2)])``) makes the
transcript's next token the only one that can be sampled: one class per
model runner, as each has its own logits-processor API
(:class:`ReplayLogitsProcessor` on V1, :class:`ReplayLogitsProcessorV2` on
Model Runner V2, the only one from vLLM 0.34 on), both on one alignment. Any model then decodes the
transcript's exact structure, whatever its weights, so that the engine's
speed can be measured on real workload shapes.

With the plugin on, a request forks into branches at ``</Goal>``: a branch's
prompt is its parent's whole sequence plus the Path header the engine
writes, and its ``extra_args`` are its parent's. So each request's sequence
after the client prompt is mapped onto the transcript (:class:`Alignment`):
the client request is a prefix of it, a branch is the transcript with the
earlier sibling Paths of each of its blocks skipped, and sequential decoding
is the transcript itself. The processor reads the whole sequence, prompt
included, and so gives a Path what sequential decoding gives it
(``multiverse_aware``). With the plugin off it forces the flat text.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from vllm.sampling_params import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as LogitsProcessorV2

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsContext, LogitsProcRequestState

REPLAY_ARG = "multiverse_replay"  # SamplingParams.extra_args key
# Far above any logit, finite so that temperature and softmax stay exact:
# every other token gets probability 0, greedy or sampled.
_FORCED_LOGIT = 1e30
# A Path header's tokens from <Path> through its label ("1.2.3:" and the
# like): how far back a divergence looks for the <Path> it belongs to.
_HEADER_WINDOW = 16
# Longest run of tokens compared at once (C list compares) when a request
# arrives with a long sequence: a branch's prompt, a resumed request.
_RUN = 256


def replay_args(prompt_len: int, answer: Sequence[int]) -> dict[str, Any]:
    """``extra_args`` that replay ``answer`` after a prompt of ``prompt_len``
    tokens."""
    return {REPLAY_ARG: {"prompt_len": int(prompt_len), "answer": [int(t) for t in answer]}}


@dataclass(frozen=True)
class Tags:
    """The tag ids alignment needs: where Paths start and blocks nest."""

    path_open: int
    parallel_open: int
    parallel_close: int


def later_siblings(answer: Sequence[int], path: int, tags: Tags) -> Iterator[int]:
    """The ``<Path>`` indices of the Paths after the one whose ``<Path>`` is
    at ``path``, in its block."""
    depth = 0
    for i in range(path + 1, len(answer)):
        t = answer[i]
        if t == tags.parallel_open:
            depth += 1
        elif t == tags.parallel_close:
            if depth == 0:
                return
            depth -= 1
        elif t == tags.path_open and depth == 0:
            yield i


class Alignment:
    """Where one request's sequence (client prompt excluded) stands in the
    transcript's answer: ``pos[i]`` is the answer index of sequence token
    ``i``. The sequence is ``prefix`` (the part of a branch's prompt after
    the client prompt) followed by the request's output list."""

    def __init__(self, answer: Sequence[int], tags: Tags | None, prefix: Sequence[int] = ()) -> None:
        self.answer = list(answer)
        self.tags = tags
        self.prefix = list(prefix)
        self.pos: list[int] = []
        self._advance(())

    def _token(self, i: int, out: Sequence[int]) -> int:
        n = len(self.prefix)
        return self.prefix[i] if i < n else out[i - n]

    def _slice(self, a: int, b: int, out: Sequence[int]) -> list[int]:
        n = len(self.prefix)
        if b <= n:
            return self.prefix[a:b]
        if a >= n:
            return list(out[a - n : b - n])
        return self.prefix[a:] + list(out[: b - n])

    def target(self, out: Sequence[int]) -> int | None:
        """The transcript's token after the sequence ``prefix + out``; None
        past its end or where the sequence left it."""
        answer, pos = self.answer, self.pos
        n = len(self.prefix) + len(out)
        # Most steps: one token more, the transcript's own.
        if out and len(pos) == n - 1 and pos and (p := pos[-1] + 1) < len(answer) and answer[p] == out[-1]:
            pos.append(p)
        else:
            # Tokens vLLM discarded (the list only shrinks; the engine's own
            # rewrites, sequential headers, land before the sampler reads it).
            del pos[n:]
            if not self._advance(out):
                return None
        nxt = pos[-1] + 1 if pos else 0
        return answer[nxt] if nxt < len(answer) else None

    def _advance(self, out: Sequence[int]) -> bool:
        answer, pos = self.answer, self.pos
        end = len(self.prefix) + len(out)
        while len(pos) < end:
            i = len(pos)
            p = pos[-1] + 1 if pos else 0
            # A whole prompt or a resumed request's outputs: list compares
            # in runs, halved down to the token where they part.
            k = min(end - i, _RUN)
            while k > 1 and self._slice(i, i + k, out) != answer[p : p + k]:
                k //= 2
            if k > 1:
                pos.extend(range(p, p + k))
            elif p < len(answer) and answer[p] == self._token(i, out):
                pos.append(p)
            elif not self._skip_to_sibling(i, out):
                return False
        return True

    def _skip_to_sibling(self, i: int, out: Sequence[int]) -> bool:
        """Token ``i`` left the transcript inside a Path header: the
        engine started a later Path of the block. Re-map the header onto
        that Path's."""
        if self.tags is None:
            return False
        path_open = self.tags.path_open
        j = next((k for k in range(i - 1, max(-1, i - _HEADER_WINDOW), -1)
                  if self._token(k, out) == path_open), None)
        if j is None:
            return False
        span = self._slice(j, i + 1, out)
        for c in later_siblings(self.answer, self.pos[j], self.tags):
            if self.answer[c : c + len(span)] == span:
                self.pos[j:] = range(c, c + len(span))
                return True
        return False


@dataclass
class _Row:
    align: Alignment
    out: list[int]  # the runner's live output list of the request


class ReplayLogitsProcessor(LogitsProcessor):
    """Forces each replayed request's next token to its transcript's."""

    # Reads the whole sequence, prompt included: a Path gets what
    # sequential decoding gives it (vllm032/validate.py accepts it).
    multiverse_aware = True

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        arg = (sampling_params.extra_args or {}).get(REPLAY_ARG)
        if arg is None:
            return
        if not (isinstance(arg, dict) and isinstance(arg.get("prompt_len"), int)
                and isinstance(arg.get("answer"), list)):
            raise ValueError(f"extra_args[{REPLAY_ARG!r}] must be {{'prompt_len': int, 'answer': [token ids]}}")

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        self.model_config = vllm_config.model_config
        self.rows: dict[int, _Row] = {}
        self._tags: Tags | None | bool = False  # False: not read yet

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, self._new_row)

    def _new_row(self, params: SamplingParams, prompt: list[int] | None, out: list[int]) -> _Row | None:
        arg = (params.extra_args or {}).get(REPLAY_ARG)
        if arg is None:
            return None
        prefix = (prompt or [])[arg["prompt_len"] :]
        return _Row(Alignment(arg["answer"], self.tags(), prefix), out)

    def tags(self) -> Tags | None:
        if self._tags is False:
            self._tags = _model_tags(self.model_config)
        return self._tags

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        rows, tokens = [], []
        for i, row in self.rows.items():
            tok = row.align.target(row.out)
            if tok is not None:
                rows.append(i)
                tokens.append(tok)
        _force(logits, rows, tokens)
        return logits


def _force(logits: torch.Tensor, rows: list[int], tokens: list[int]) -> None:
    if rows:
        index = torch.tensor([rows, tokens], dtype=torch.int64)
        if logits.device.type != "cpu":
            index = index.pin_memory().to(logits.device, non_blocking=True)
        logits[index[0], index[1]] = _FORCED_LOGIT


@dataclass
class _Slot:
    prompt_len: int  # the client prompt's
    align: Alignment  # of what follows the client prompt
    seq: list[int]  # what follows it, as last read


# Tokens before the last read end read again each step (a margin: the
# engine's rewrites start after it).
_REREAD = 16


class ReplayLogitsProcessorV2(LogitsProcessorV2):
    """:class:`ReplayLogitsProcessor` on Model Runner V2's API: a request
    slot's sequence is read off the runner's token buffer (prompt and
    output together, the engine's written tokens included) up to its length,
    where V1 hands a live output list."""

    multiverse_aware = True
    validate_params = ReplayLogitsProcessor.validate_params

    def __init__(self, vllm_config: VllmConfig, req_states: LogitsProcRequestState) -> None:
        self.model_config = vllm_config.model_config
        self.req_states = req_states
        self.slots: dict[int, _Slot] = {}
        self._tags: Tags | None | bool = False

    tags = ReplayLogitsProcessor.tags

    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        arg = (sampling_params.extra_args or {}).get(REPLAY_ARG)
        if arg is None:
            self.slots.pop(req_idx, None)  # slots are recycled
            return False
        self.slots[req_idx] = _Slot(arg["prompt_len"], Alignment(arg["answer"], self.tags()), [])
        return True

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        if not self.slots:
            return logits
        slots = ctx.expanded_idx_mapping.tolist()
        if not any(s in self.slots for s in slots):
            return logits
        # The whole buffers, once: a device tensor on CUDA, the same memory on CPU.
        lengths = self.req_states.total_len.gpu.cpu()
        token_ids = self.req_states.all_token_ids.gpu
        rows, tokens = [], []
        for row, slot in enumerate(slots):
            entry = self.slots.get(slot)
            if entry is None:
                continue
            # Only the tail is read again: the engine rewrites tokens after
            # the ones this processor last saw, never before.
            seq, end = entry.seq, int(lengths[slot]) - entry.prompt_len
            start = max(0, min(len(seq), end) - _REREAD)
            seq[start:] = token_ids[slot, entry.prompt_len + start : entry.prompt_len + end].tolist()
            tok = entry.align.target(seq)
            if tok is not None:
                rows.append(row)
                tokens.append(tok)
        _force(logits, rows, tokens)
        return logits


def processor_for(use_v2: bool) -> str:
    """The replay processor for a model runner, as ``--logits-processors``
    names it."""
    return f"forcing:{ReplayLogitsProcessorV2.__name__ if use_v2 else ReplayLogitsProcessor.__name__}"


def _model_tags(model_config) -> Tags | None:
    """The tag ids from the model's Multiverse declaration (config.json, or
    set by the plugin), else from its tokenizer; None for a model without
    them (the transcript is then forced as flat text)."""
    from vllm_multiverse.model_config import read_model_declaration

    info = read_model_declaration(model_config.hf_config)
    if info is not None:
        t = info.tokens
        return Tags(t.path_open, t.parallel_open, t.parallel_close)
    if model_config.skip_tokenizer_init:
        return None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        model_config.tokenizer, revision=model_config.tokenizer_revision,
        trust_remote_code=model_config.trust_remote_code,
    )
    vocab = tok.get_vocab()
    names = ("<Path>", "<Parallel>", "</Parallel>")
    if not all(n in vocab for n in names):
        return None
    return Tags(*(vocab[n] for n in names))
