"""What a request's sampled token does: it is the model's text, or it is the
engine's turn (a fork, the headers the engine writes, the end of a branch's
Path). The host asks :func:`before_sample` before it appends a step's token
and hands each appended token to :func:`on_token` after its own stop check;
it carries out what they return."""

from __future__ import annotations

from dataclasses import dataclass

from vllm_multiverse.structure import Event
from vllm_multiverse.tree.lifecycle import open_fork
from vllm_multiverse.tree.registry import Trees
from vllm_multiverse.tree.track import Act, Track


@dataclass(frozen=True)
class Drained:
    """A branch's Path ended a step ago (that step computed its tail's KV):
    the token sampled now is not text, and the request finishes, stopped."""


@dataclass(frozen=True)
class Parked:
    """The request forked: it leaves the running queue, holding its blocks,
    until its merge."""


@dataclass(frozen=True)
class Wrote:
    """The engine wrote these tokens after the request's own (the sequential
    layer's headers); ``capped``: they took the last of its room, and it
    finishes at its length limit."""

    tokens: tuple[int, ...]
    capped: bool


Action = Drained | Parked | Wrote
DRAINED, PARKED = Drained(), Parked()


def before_sample(trees: Trees, request_id: str) -> Action | None:
    """Before the step's sampled token is appended: None where it is the
    model's, else what the engine does instead (the token is dropped)."""
    track = trees.tracks[request_id]
    if track.draining:
        return DRAINED
    if not track.engine_due:
        return None
    track.engine_due = False
    return _engine_turn(trees, request_id, track, track.state.event)


def on_token(
    trees: Trees, request_id: str, tok: int, logprobs: object = None, stopped: bool = False
) -> Action | None:
    """A sampled token appended to the request (``logprobs``: its own, kept
    by a branch whose client asked for them; ``stopped``: the host's stop
    check ended the request on it, so the engine takes no turn)."""
    track = trees.tracks[request_id]
    ev = track.append(tok)
    if track.logprobs is not None:
        track.logprobs.append(logprobs)
    if track.in_fork is not None and track.in_fork.concurrency > 1:
        trees.stats["parallel_tokens"] += 1
    if stopped:
        return None
    what = track.act(ev)
    if what is None:
        return None
    if what is Act.END_PATH:
        track.draining = True
        return None
    return _engine_turn(trees, request_id, track, ev)


def _engine_turn(trees: Trees, request_id: str, track: Track, ev: Event) -> Action:
    if track.act(ev) is Act.FORK:
        open_fork(trees, request_id)
        return PARKED
    room = track.room(trees.max_model_len)
    tokens = ev.write[:room]
    if track.fix_from is None:
        track.fix_from = len(track)
        trees.to_fix.add(request_id)
    for tok in tokens:
        track.append(tok, written=True)
        if track.logprobs is not None:
            track.logprobs.append(None)
    return Wrote(tuple(tokens), capped=len(ev.write) >= room)
