"""The Multiverse structure rule: one token at a time.

This is the only implementation of the rule. The batch form
(:func:`vllm_multiverse.structure.analysis.analyze`), the trainer, the
reference decoder and the engine all drive this state machine. See
``docs/structure.md`` for the rule, the two position conventions and the
defined behaviour on malformed input.

Per appended token the state answers, in O(1) amortised time:

- its position id;
- which block, part and Path it belongs to (``chain``: the open Path of every
  enclosing block, outermost first);
- which earlier KV ranges it must not see (``hidden_ranges``): the finished
  sibling Paths of every enclosing block;
- an :class:`Event` when the engine has to act (fork, next Path, Conclusion).

The rule never raises on token input: a span that breaks the grammar is
treated as plain causal text and recorded in ``notes``.
"""

from __future__ import annotations

import copy
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from vllm_multiverse.structure.tokens import MultiverseTokens

PositionConvention = Literal["training", "engine"]
_MAX_LABEL_TOKENS = 16


@dataclass(frozen=True)
class StructureConfig:
    """Knobs of the rule (not of the engine's resource caps)."""

    # "training": the authors' train/utils.py positions (default).
    # "engine": the authors' SGLang engine positions (+1 inside Paths,
    # +2 from the Conclusion on, per block).
    positions: PositionConvention = "training"
    # A <Parallel> nested deeper than this is plain causal text.
    max_depth: int = 8
    # A Goal with more labelled Outlines than this is plain causal text.
    max_outlines: int = 64

    def __post_init__(self) -> None:
        if self.positions not in ("training", "engine"):
            raise ValueError(f"unknown position convention {self.positions!r}")
        if self.max_depth < 1 or self.max_outlines < 1:
            raise ValueError("max_depth and max_outlines must be at least 1")


class Part(enum.IntEnum):
    """Where a token sits relative to its innermost Parallel block."""

    OUTSIDE = 0
    GOAL = 1  # <Parallel> through </Goal>
    PATH = 2  # <Path> through the token after </Path>
    BETWEEN = 3  # in the Paths phase, outside every Path
    CONCLUSION = 4  # <Conclusion> through </Parallel>


class EventKind(enum.Enum):
    FORK = "fork"  # after </Goal>: start one Path per label
    NEXT_PATH = "next_path"  # a Path ended and another is due
    CONCLUSION = "conclusion"  # the last Path ended


@dataclass(frozen=True)
class Event:
    kind: EventKind
    index: int  # the token after which the engine acts
    block: int  # uid of the block (index of its <Parallel>)
    depth: int  # 1 = top level
    # What the sequential layer writes now.
    write: tuple[int, ...]
    # FORK only: one full header per Path (what each branch starts with).
    branch_headers: tuple[tuple[int, ...], ...] = ()


@dataclass(frozen=True)
class Note:
    """A malformed span, treated as plain causal text."""

    index: int
    message: str


_GOAL, _PATHS, _CONCLUSION = range(3)


@dataclass
class _Block:
    uid: int
    depth: int
    causal: bool = False
    phase: int = _GOAL
    in_goal: bool = False
    goal_seen: bool = False
    labels: list[tuple[int, ...]] = field(default_factory=list)
    label_buf: list[int] | None = None
    label_gap: bool = False  # whitespace after the label's chars: only its ":" may follow
    path_start: int = -1  # position of every <Path> of the block
    max_end: int = -1  # the Conclusion sits at max_end + 1
    open_path: int = -1  # index of the open Path, -1 if none
    span_start: int = -1  # token index of the open Path's <Path>
    tail_pending: bool = False  # </Path> seen; the next token ends the span
    paths_opened: int = 0
    done_spans: list[tuple[int, int]] = field(default_factory=list)

    def copy(self) -> _Block:
        new = copy.copy(self)
        new.labels = list(self.labels)
        new.label_buf = None if self.label_buf is None else list(self.label_buf)
        new.done_spans = list(self.done_spans)
        return new


class StructureState:
    """Incremental Multiverse structure of a growing token sequence."""

    def __init__(self, tokens: MultiverseTokens, config: StructureConfig | None = None) -> None:
        self.config = config or StructureConfig()
        self._t = tokens
        self._train = self.config.positions == "training"
        self._stack: list[_Block] = []
        self._chain: list[tuple[int, int]] = []
        self._chain_blocks: list[_Block] = []
        self._chain_dirty = False
        # A Path's span ends after its tail token; it is closed when the
        # next token arrives so that the tail itself still sees as a Path.
        self._closing: _Block | None = None
        self._n = 0
        self._next_pos = 0
        # Answers about the last appended token.
        self.position = -1
        self.chain: tuple[tuple[int, int], ...] = ()
        self.block = -1
        self.part = Part.OUTSIDE
        self.depth = 0
        self.event: Event | None = None
        self.notes: list[Note] = []

    def __len__(self) -> int:
        return self._n

    @property
    def open_blocks(self) -> int:
        """Parallel blocks opened and not yet closed (causal ones included)."""
        return len(self._stack)

    def copy(self) -> StructureState:
        """An independent copy (a branch continues from its parent's state).

        By hand, not ``deepcopy``: a fork copies one state per Path, and
        the tokens, config, events and notes are immutable and shared."""
        copies: dict[int, _Block] = {}

        def mine(b: _Block) -> _Block:
            # One copy per block: the stack, the chain and the closing Path share them.
            if id(b) not in copies:
                copies[id(b)] = b.copy()
            return copies[id(b)]

        new = copy.copy(self)
        new._stack = [mine(b) for b in self._stack]
        new._chain_blocks = [mine(b) for b in self._chain_blocks]
        new._closing = None if self._closing is None else mine(self._closing)
        new._chain = list(self._chain)
        new.notes = list(self.notes)
        return new

    def hidden_ranges(self) -> list[tuple[int, int]]:
        """KV index ranges [start, end) the last token must not see."""
        out: list[tuple[int, int]] = []
        for blk in self._chain_blocks:
            out.extend(blk.done_spans)
        return out

    def extend(self, token_ids) -> list[Event]:
        events = []
        for tok in token_ids:
            ev = self.append(tok)
            if ev is not None:
                events.append(ev)
        return events

    def extend_outside(self, token_ids: Sequence[int], start: int = 0) -> int:
        """Append ``token_ids[start:]`` up to the first token that is not
        plain text outside every block (a ``<Parallel>``, or anything once a
        block is open), in bulk: what :meth:`append` does one at a time.
        Returns the index where it stopped."""
        if self._stack:
            return start
        try:
            end = token_ids.index(self._t.parallel_open, start)
        except ValueError:
            end = len(token_ids)
        if end > start:
            self._append_outside(end - start)
        return end

    def append(self, tok: int) -> Event | None:
        t = self._t
        if not self._stack and tok != t.parallel_open:
            # Text outside every block (most tokens of most requests): what
            # the general path below does for it, inline.
            self._n += 1
            self.position = pos = self._next_pos
            self._next_pos = pos + 1
            if self.block != -1:
                self._leave_blocks()
            self.event = None
            return None
        i = self._n
        if self._closing is not None:
            self._close_path(self._closing, i)
        self._n += 1
        pos = self._next_pos
        event: Event | None = None
        closing: _Block | None = None
        popped: _Block | None = None
        top = self._stack[-1] if self._stack else None

        if top is None:
            if tok == t.parallel_open:
                top = self._push(i, causal=False)
        elif top.tail_pending:
            # Any token after </Path> is that Path's tail (normally "\n").
            closing = top
        elif top.causal:
            if tok == t.parallel_open:
                self._stack.append(_Block(uid=i, depth=top.depth + 1, causal=True))
            elif tok == t.parallel_close:
                self._stack.pop()
        elif tok == t.parallel_open:
            if top.phase == _PATHS and top.open_path >= 0:
                top = self._push(i, causal=False)
            else:
                self._note(i, "<Parallel> outside a Path: nested block is causal")
                self._stack.append(_Block(uid=i, depth=top.depth + 1, causal=True))
        elif tok == t.parallel_close and top.open_path < 0:
            if top.phase != _CONCLUSION:
                self._note(i, "</Parallel> before a Conclusion")
            popped = self._stack.pop()
        elif top.phase == _GOAL:
            event = self._goal_token(top, tok, i, pos)
        elif top.phase == _PATHS:
            if top.open_path < 0:
                if tok == t.path_open:
                    if top.path_start < 0:
                        top.path_start = pos
                    pos = top.path_start
                    top.open_path = top.paths_opened
                    top.paths_opened += 1
                    top.span_start = i
                    self._chain.append((top.uid, top.open_path))
                    self._chain_blocks.append(top)
                    self._chain_dirty = True
                elif tok == t.conclusion_open:
                    pos = top.max_end + 1
                    top.phase = _CONCLUSION
            elif tok == t.path_close:
                top.tail_pending = True
                if self._train:
                    top.max_end = max(top.max_end, pos)

        # Describe the token, then let a finished span close.
        self.position = pos
        self._next_pos = pos + 1
        self._describe(popped)
        if event is not None:  # a FORK: </Goal> still belongs to the Goal
            self.part = Part.GOAL
        if closing is not None:
            event = self._tail_seen(closing, i, pos)
        self.event = event
        return event

    # -- helpers -------------------------------------------------------

    def _append_outside(self, n: int) -> None:
        self._n += n
        self.position = self._next_pos + n - 1
        self._next_pos += n
        if self.block != -1:
            self._leave_blocks()
        self.event = None

    def _leave_blocks(self) -> None:
        # The first token after the last block closed. The chain was made
        # clean by that block's last token; block -1 always comes with depth
        # 0 and OUTSIDE (see _describe), so later tokens need not set them.
        self.block, self.depth, self.part = -1, 0, Part.OUTSIDE

    def _push(self, i: int, causal: bool) -> _Block:
        depth = len(self._stack) + 1
        if depth > self.config.max_depth:
            self._note(i, f"Parallel block deeper than max_depth={self.config.max_depth}: causal")
            causal = True
        blk = _Block(uid=i, depth=depth, causal=causal)
        self._stack.append(blk)
        return blk

    def _goal_token(self, blk: _Block, tok: int, i: int, pos: int) -> Event | None:
        t = self._t
        if tok == t.goal_open and not blk.goal_seen:
            blk.in_goal = blk.goal_seen = True
            return None
        if tok == t.outline_open and blk.in_goal:
            blk.label_buf = []
            blk.label_gap = False
            return None
        if tok == t.goal_close:
            blk.in_goal = False
            blk.label_buf = None
            n = len(blk.labels)
            if n == 0 or n > self.config.max_outlines:
                why = "no labelled Outline" if n == 0 else f"{n} Outlines > max_outlines"
                self._note(i, f"Goal with {why}: block is causal")
                blk.causal = True
                return None
            blk.phase = _PATHS
            blk.max_end = pos
            if self._train:
                blk.path_start = pos + 1
            headers = tuple(t.path_header(lbl) for lbl in blk.labels)
            return Event(EventKind.FORK, i, blk.uid, blk.depth, headers[0], headers)
        buf = blk.label_buf
        if buf is None:
            return None
        if tok in t.space_ids:
            # Before the label, or between it and its ":" ("1 :").
            blk.label_gap = bool(buf)
            return None
        if tok in t.label_char_ids and len(buf) < _MAX_LABEL_TOKENS and not blk.label_gap:
            buf.append(tok)
        elif tok in t.label_end_ids:
            blk.labels.append(t.label(tuple(buf), tok))
            blk.label_buf = None
        else:
            blk.label_buf = None  # an Outline without a label: no Path for it
        return None

    def _tail_seen(self, blk: _Block, i: int, pos: int) -> Event | None:
        self._closing = blk
        if not self._train:
            blk.max_end = max(blk.max_end, pos)
        done = len(blk.done_spans) + 1
        t = self._t
        if done < len(blk.labels):
            header = t.path_header(blk.labels[done], first=False)
            return Event(EventKind.NEXT_PATH, i, blk.uid, blk.depth, header)
        if done == len(blk.labels):
            return Event(EventKind.CONCLUSION, i, blk.uid, blk.depth, t.conclusion_header)
        return None

    def _close_path(self, blk: _Block, end: int) -> None:
        self._closing = None
        blk.done_spans.append((blk.span_start, end))
        blk.tail_pending = False
        blk.open_path = -1
        self._chain.pop()
        self._chain_blocks.pop()
        self._chain_dirty = True

    def _describe(self, popped: _Block | None) -> None:
        if self._chain_dirty:
            self.chain = tuple(self._chain)
            self._chain_dirty = False
        blk = popped
        if blk is None:
            # Tokens inside a causal block belong to the block around it.
            for b in reversed(self._stack):
                if not b.causal:
                    blk = b
                    break
        if blk is None:
            self.block, self.depth, self.part = -1, 0, Part.OUTSIDE
            return
        self.block, self.depth = blk.uid, blk.depth
        if blk.open_path >= 0 or blk.tail_pending:
            self.part = Part.PATH
        elif blk.phase == _GOAL:
            self.part = Part.GOAL
        elif blk.phase == _PATHS:
            self.part = Part.BETWEEN
        else:
            self.part = Part.CONCLUSION

    def _note(self, i: int, message: str) -> None:
        self.notes.append(Note(i, message))
