"""A fork's life: opened at a ``</Goal>``, its Paths launched as branch
requests when they may run, each branch's end taken into the fork, and what
an abort takes with it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from vllm_multiverse.tree.fork import Fork, concurrency
from vllm_multiverse.tree.registry import Trees
from vllm_multiverse.tree.text_order import BranchResult, End, Finish, StopRule, text_in_order


def open_fork(trees: Trees, parent_id: str) -> Fork:
    """The parent's text reached a ``</Goal>`` that opens Paths: it parks,
    holding its blocks, until the merge."""
    track = trees.tracks[parent_id]
    ev = track.state.event
    n = len(ev.branch_headers)
    live = sum(
        len(f.running) + len(f.pending)
        for f in trees.forks.values()
        if f.client == track.client and f.concurrency > 1
    )
    conc, capped = concurrency(n, ev.depth, live, trees.config)
    trees.stats["fallbacks"] += capped
    fork = Fork(
        parent=parent_id,
        parallel_uid=ev.block,
        root=track.root,
        client=track.client,
        headers=ev.branch_headers,
        prefix_len=len(track),
        lead_len=len(trees.tokens.path_header_lead),
        rule=StopRule(track.room(trees.max_model_len), track.limits.stop_ids, track.limits.eos),
        concurrency=conc,
        keep_logprobs=track.keep_logprobs,
        pending=list(range(n)),
    )
    trees.forks[parent_id] = fork
    trees.stats["forks"] += 1
    trees.paths_per_fork[n] += 1
    return fork


@dataclass(frozen=True)
class Launch:
    """A branch request to start on its parent's blocks."""

    fork: Fork
    path: int
    branch_id: str
    header: tuple[int, ...]  # its prompt is the parent's tokens and this
    max_tokens: int
    seed: int | None  # None: greedy


def launch_plan(trees: Trees) -> list[list[Launch]]:
    """The Paths that may start now, fork by fork, in order. The host
    starts them and reports each with :func:`launched`; a fork's first one
    that does not fit ends its list (it is offered again next step)."""
    plan = []
    for fork in trees.forks.values():
        free = fork.concurrency - len(fork.running)
        if fork.cut is not None or free <= 0 or not fork.pending:
            continue
        parent = trees.tracks[fork.parent]
        plan.append([
            Launch(fork, k, fork.branch_id(k), fork.headers[k], max(1, fork.rule.budget - len(fork.headers[k])),
                   parent.path_seed(fork, k))
            for k in fork.pending[:free]
        ])  # fmt: skip
    return plan


def launched(trees: Trees, launch: Launch) -> None:
    fork = launch.fork
    fork.pending.remove(launch.path)
    fork.running[launch.path] = launch.branch_id
    parent = trees.tracks[fork.parent]
    trees.tracks[launch.branch_id] = parent.branch(fork, launch.path, launch.header, launch.max_tokens)


def finished(trees: Trees, request_id: str, finish: Finish, stop_reason: int | str | None = None) -> bool:
    """The host is freeing a finished request. True if the tree took its
    blocks (a branch whose Path ended, its KV stashed for the merge)."""
    trees.copies.drop(request_id)
    track = trees.tracks.pop(request_id, None)
    if track is None:
        return False
    fork = track.in_fork
    if fork is None:
        trees.roots_finished += 1
        return False
    k = track.path
    if trees.forks.get(fork.parent) is not fork or fork.running.get(k) != request_id:
        return False  # the tree dropped it first (an abort, a preemption, a merge)
    del fork.running[k]
    # At its tail the Path is complete; any other end is where the text ends.
    end = None if finish is Finish.STOPPED and track.draining else End(finish, stop_reason)
    if finish is Finish.ABORTED:
        # Aborted alone (by the host, not with its tree): run the Path again.
        fork.pending = sorted([*fork.pending, k])
        return False
    start = fork.text_start(k)
    logprobs = track.tail_logprobs(len(track) - start)
    fork.results[k] = BranchResult(
        request_id=request_id,
        tokens=track.tokens[start:].tolist(),
        written=bytes(track.written[start:]),
        blocks=trees.blocks.detach(request_id),
        end=end,
        logprobs=logprobs if logprobs is not None and len(logprobs) == len(track) - start else None,
    )
    if fork.cut is None:
        # Decided once: Paths that end later lie past the end of the text.
        fork.cut = text_in_order(fork.results, fork.num_paths, fork.rule, trees.tokens.conclusion_header)
    return True


def abort(trees: Trees, request_ids: Iterable[str]) -> set[str]:
    """The requests to finish for these: a parent takes its whole tree of
    branches with it. The forks' stashed Paths are released here."""
    ids = set(request_ids)
    todo = list(ids)
    while todo:
        rid = todo.pop()
        trees.copies.drop(rid)
        trees.live_sent.pop(rid, None)
        fork = trees.forks.pop(rid, None)
        if fork is None:
            continue
        ids.update(fork.running.values())
        todo.extend(fork.running.values())
        drop(trees, fork)
    return ids


def abort_all(trees: Trees) -> list[str]:
    """Everything goes; returns the held roots, for the host to finish too."""
    for fork in trees.forks.values():
        drop(trees, fork)
    trees.forks.clear()
    trees.copies.drop_all()
    trees.live_sent.clear()
    held, trees.held = [h.root for h in trees.held], []
    return held


def drop(trees: Trees, fork: Fork) -> None:
    """A fork's work goes: its stashed Paths released, nothing left to run."""
    for res in fork.results.values():
        trees.blocks.release(res.blocks[::-1])
    fork.results.clear()
    fork.running.clear()
    fork.pending.clear()
    fork.cut = None
