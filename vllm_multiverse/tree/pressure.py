"""Memory pressure: which tree to preempt and when, what to roll back, and
when a held tree comes back.

The unit of preemption is a whole tree (a root request, its parked forks,
their branches and the Paths they stashed): preempting one branch frees
little while its parked parent keeps its blocks, and the tree may then
never finish. Victims are chosen as vLLM chooses its own: the lowest
priority, then the newest (``policy`` is vLLM's scheduling policy, "fcfs"
or "priority"). The host carries out each decision (finishing branches,
preempting the root) and asks again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from vllm_multiverse.tree.fork import Fork
from vllm_multiverse.tree.lifecycle import drop
from vllm_multiverse.tree.registry import Held, Trees


@dataclass(frozen=True)
class Candidate:
    root: str
    priority: int
    arrival: float
    order: int  # admission order: n > 1 siblings share an arrival time


@dataclass(frozen=True)
class RollBack:
    """Run the newest fork's Paths one at a time: the host aborts these
    branches (their text comes again: a Path's tokens are a function of it)."""

    branches: list[str]


def _key(c: Candidate, policy: str) -> tuple:
    tail = (c.arrival, c.order)
    return (c.priority, *tail) if policy == "priority" else tail


def victim(candidates: Sequence[Candidate], policy: str) -> Candidate:
    return max(candidates, key=lambda c: _key(c, policy))


def victims_for(
    deficit: int, candidates: Sequence[Candidate], freeable: Callable[[str], int], policy: str
) -> list[Candidate] | None:
    """The fewest trees, lowest priority and newest first, whose blocks cover
    ``deficit``; None if even all of them would not (then preempt nothing)."""
    chosen: list[Candidate] = []
    freed = 0
    for c in sorted(candidates, key=lambda c: _key(c, policy), reverse=True):
        if freed >= deficit:
            break
        chosen.append(c)
        freed += freeable(c.root)
    return chosen if freed >= deficit else None


def active_roots(trees: Trees, running: Iterable[str]) -> list[str]:
    """Root requests holding KV: running, or parked at a fork."""
    tracks = trees.tracks
    roots = {tracks[r].root: None for r in running if r in tracks}
    roots.update((f.root, None) for f in trees.forks.values())
    return list(roots)


def candidates(trees: Trees, roots: Iterable[str]) -> list[Candidate]:
    tracks = trees.tracks
    return [Candidate(r, tracks[r].priority, tracks[r].arrival, tracks[r].order) for r in roots]


def to_relieve(trees: Trees, running: Sequence[str], policy: str) -> str | None:
    """Before scheduling: the tree to preempt while the running requests'
    next tokens do not fit (vLLM would preempt a branch or a parked parent's
    sibling alone), or None."""
    if not trees.forks or trees.blocks.blocks_short(running) <= 0:
        return None
    roots = active_roots(trees, running)
    return victim(candidates(trees, roots), policy).root if len(roots) >= 2 else None


def to_give_back(trees: Trees, running: Sequence[str], policy: str) -> str | RollBack | None:
    """Nothing could be scheduled while finished branches and parked parents
    hold the KV that waiting branches, launches or merges need: the tree to
    preempt, or with one tree left, its newest fork rolled back."""
    roots = active_roots(trees, running)
    if len(roots) >= 2:
        return victim(candidates(trees, roots), policy).root
    branches = roll_back_newest_fork(trees)
    return None if branches is None else RollBack(branches)


def room_for(trees: Trees, blocks: int, fork: Fork, running: Sequence[str], policy: str) -> list[str] | None:
    """The trees to preempt (none: there is room) so that a merge gets its
    fresh blocks, only if that is enough; None if it is not (try next step)."""
    deficit = blocks - trees.blocks.num_free()
    if deficit <= 0:
        return []
    roots = [r for r in active_roots(trees, running) if r != fork.root]
    chosen = victims_for(deficit, candidates(trees, roots), lambda r: _freeable(trees, r), policy)
    return None if chosen is None else [c.root for c in chosen]


def _freeable(trees: Trees, root: str) -> int:
    forks = trees.tree_forks(root)
    ids = [root] + [b for f in forks for b in f.running.values()]
    return trees.blocks.freeable(ids, [s for f in forks for s in f.stashes()])


def preempt_tree(trees: Trees, root: str) -> list[str]:
    """Drop every fork of a tree and hold it; returns its branches, for the
    host to abort (the root itself the host preempts)."""
    branches: list[str] = []
    for fork in trees.tree_forks(root):
        del trees.forks[fork.parent]
        branches += fork.running.values()
        drop(trees, fork)
    track = trees.tracks[root]
    trees.held.append(Held(root, trees.roots_finished, track.arrival, track.order))
    return branches


def release_held(trees: Trees, running: Sequence[str]) -> list[str]:
    """Held trees to readmit, oldest first: all once nothing else holds KV,
    else one, after some tree has finished since it was preempted."""
    if not trees.held:
        return []
    if not active_roots(trees, running):
        ready = list(trees.held)
    else:
        ready = [h for h in trees.held if h.roots_finished < trees.roots_finished][:1]
    trees.held = [h for h in trees.held if h not in ready]
    return [h.root for h in sorted(ready, key=lambda h: (h.arrival, h.order))]


def unhold(trees: Trees, request_ids: Iterable[str]) -> list[str]:
    """The held roots among these (being finished): out of the held list."""
    ids = set(request_ids)
    out = [h.root for h in trees.held if h.root in ids]
    trees.held = [h for h in trees.held if h.root not in ids]
    return out


def roll_back_newest_fork(trees: Trees) -> list[str] | None:
    """Drop the work of the newest fork that has any, to run its Paths one
    at a time; returns its branches for the host to abort. Branch tokens are
    a function of the branch (greedy, or its own seed), so running them again
    gives the same text."""
    for fork in reversed(list(trees.forks.values())):
        if fork.cut is not None or (not fork.running and not fork.results):
            continue
        branches = list(fork.running.values())
        drop(trees, fork)
        fork.pending = list(range(fork.num_paths))
        fork.concurrency = 1
        trees.stats["rollbacks"] += 1
        return branches
    return None
