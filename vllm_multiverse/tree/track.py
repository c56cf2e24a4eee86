"""One request's Multiverse view: its tokens and structure, and per token the
position, the KV ranges it must not see, and whether the engine wrote it."""

from __future__ import annotations

import enum
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from vllm_multiverse.structure import Event, EventKind, StructureState
from vllm_multiverse.structure.masks import Hidden, Rect, rects_for
from vllm_multiverse.tree.fork import Fork, branch_seed


class Act(enum.Enum):
    """What the engine does at a structure event."""

    FORK = "fork"  # start one branch per Path
    END_PATH = "end_path"  # this branch's Path is done (after its tail's KV)
    WRITE = "write"  # append the event's engine-written tokens (sequential layer)


@dataclass(frozen=True)
class Limits:
    """What a request may append, and what stops its text."""

    max_tokens: int  # after its prompt
    stop_ids: frozenset[int] = frozenset()  # EOS included unless ignored
    eos: int | None = None

    @classmethod
    def of(cls, max_tokens: int, stop_ids: Iterable[int], eos: int | None, ignore_eos: bool) -> Limits:
        stops = set(stop_ids)
        if eos is not None and not ignore_eos:
            stops.add(eos)
        return cls(max_tokens, frozenset(stops), eos)


@dataclass(eq=False)
class Track:
    state: StructureState
    root: str  # the client request at the top of the tree
    client: str  # the client request it serves (n > 1 siblings share one)
    limits: Limits
    num_prompt: int = 0  # its request's prompt (a branch's: its parent's text and its header)
    order: int = 0  # admission order, for ties between equal arrival times
    priority: int = 0
    arrival: float = 0.0
    sequential: bool = False  # Paths one after another in this sequence
    # What its branches' seeds derive from (None: greedy): a Path run again
    # after a preemption or a roll-back samples the same text.
    seed: int | None = None
    keep_logprobs: bool = False  # its client asked for logprobs
    in_fork: Fork | None = None  # the fork this branch belongs to (None: a client request)
    path: int = 0  # its Path in that fork
    tokens: array = field(default_factory=lambda: array("q"))
    positions: array = field(default_factory=lambda: array("q"))
    # Token index -> KV ranges it must not see; only tokens that have any.
    hidden: dict[int, Hidden] = field(default_factory=dict)
    written: bytearray = field(default_factory=bytearray)  # 1 where the engine wrote it
    # The tokens so far end where the engine acts (a </Goal>, or a Path's
    # tail in sequential text): the next sampled token is not the model's.
    engine_due: bool = False
    draining: bool = False  # tail seen: one more step computes its KV
    # A branch's logprobs per output token (None where written), kept for the
    # merge; None where none were asked for (and for client requests, whose
    # own tokens carry theirs).
    logprobs: list | None = None
    # The runner keeps its own copy of the tokens and knows only the sampled
    # ones: from this index on, it is sent the written text.
    fix_from: int | None = None
    # From token run_start on, every token's index minus its position is
    # run_delta: positions_for answers in O(1) for a range in that run
    # (any range after the last shift, which is where decoding happens
    # outside the Paths).
    run_start: int = 0
    run_delta: int = 0

    @property
    def is_branch(self) -> bool:
        return self.in_fork is not None

    def room(self, max_model_len: int) -> int:
        """Tokens it may still append: max_tokens and max_model_len."""
        n = len(self.positions)
        return min(self.limits.max_tokens - (n - self.num_prompt), max_model_len - n)

    def append(self, tok: int, written: bool = False) -> Event | None:
        state = self.state
        ev = state.append(tok)
        i = len(self.positions)
        if state.chain:  # only a token inside a Path has hidden ranges
            hidden = state.hidden_ranges()
            if hidden:
                self.hidden[i] = tuple(hidden)
        pos = state.position
        if i - pos != self.run_delta:
            self.run_start, self.run_delta = i, i - pos
        self.tokens.append(tok)
        self.positions.append(pos)
        self.written.append(written)
        return ev

    def extend(self, tokens: Sequence[int], written: Sequence[bool] | None = None) -> None:
        i, n = 0, len(tokens)
        while i < n:
            # Plain text outside every block goes in bulk (a prompt, mostly).
            j = self.state.extend_outside(tokens, i)
            if j > i:
                # It continues the last token's shift: run_delta holds.
                first = self.state.position - (j - i) + 1
                self.tokens.extend(tokens[i:j])
                self.positions.extend(range(first, first + j - i))
                self.written.extend(bytes(j - i) if written is None else bytes(map(bool, written[i:j])))
                i = j
            if i < n:
                self.append(tokens[i], bool(written[i]) if written is not None else False)
                i += 1

    def __len__(self) -> int:
        return len(self.positions)

    def tail_logprobs(self, n: int, skip: int = 0) -> list | None:
        """Logprobs of its last ``n`` tokens, from ``skip`` on (None where the
        engine wrote the token: a branch writes its header, then keeps
        logprobs per token); None if it keeps none or they are more than ``n``."""
        if self.logprobs is None or len(self.logprobs) > n:
            return None
        pad = n - len(self.logprobs)
        return [None] * max(0, pad - skip) + self.logprobs[max(0, skip - pad) :]

    def act(self, ev: Event | None) -> Act | None:
        if ev is None:
            return None
        if ev.kind is EventKind.FORK and not self.sequential:
            return Act.FORK
        if self.in_fork is not None and ev.block == self.in_fork.parallel_uid:
            return Act.END_PATH  # NEXT_PATH / CONCLUSION of its own block
        return Act.WRITE

    def arm(self) -> None:
        """After a prefill or a recompute: is the engine due to act once the
        tokens so far have their KV?"""
        ev = self.state.event
        self.engine_due = ev is not None and (ev.kind is EventKind.FORK or bool(ev.write))
        if self.engine_due and self.act(ev) is Act.END_PATH:
            self.engine_due, self.draining = False, True

    def positions_for(self, start: int, end: int) -> int | list[int] | None:
        """What the runner needs to give tokens ``start..end-1`` their
        positions: None (their index), one offset to subtract, or a list."""
        if start >= self.run_start and end <= len(self.positions):
            return self.run_delta or None
        pos = self.positions[start:end]
        delta = start - pos[0]
        if all(p + delta == start + j for j, p in enumerate(pos)):
            return delta or None
        return pos.tolist()

    def rects_for(self, start: int, end: int) -> list[Rect]:
        return rects_for(self.hidden, start, end) if self.hidden else []

    def path_seed(self, fork: Fork, path: int) -> int | None:
        """The seed of its fork's branch for ``path`` (None: greedy)."""
        return None if self.seed is None else branch_seed(self.seed, fork.parallel_uid, path)

    def branch(self, fork: Fork, path: int, header: Iterable[int], max_tokens: int) -> Track:
        """A branch's track: this track's tokens, then the Path's header."""
        child = Track(
            self.state.copy(),
            root=self.root,
            client=self.client,
            limits=Limits(max_tokens, self.limits.stop_ids, self.limits.eos),
            order=self.order,
            priority=self.priority,
            arrival=self.arrival,
            keep_logprobs=self.keep_logprobs,
            in_fork=fork,
            path=path,
            tokens=array("q", self.tokens),
            positions=array("q", self.positions),
            run_start=self.run_start,
            run_delta=self.run_delta,
            hidden=dict(self.hidden),
            written=bytearray(self.written),
            logprobs=[] if self.keep_logprobs else None,
            seed=self.path_seed(fork, path),
        )
        for tok in header:
            child.append(tok, written=True)
        child.num_prompt = len(child)
        return child
