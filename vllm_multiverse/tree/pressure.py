"""Memory pressure: which tree to preempt, and when a held tree comes back.

The unit of preemption is a whole tree (a root request, its parked forks,
their branches and the Paths they stashed): preempting one branch frees
little while its parked parent keeps its blocks, and the tree may then
never finish. Victims are chosen as vLLM chooses its own: the lowest
priority, then the newest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    root: str
    priority: int
    arrival: float
    order: int  # admission order: n > 1 siblings share an arrival time


def _key(c: Candidate, policy: str):
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


@dataclass(frozen=True)
class Held:
    """A tree preempted for memory, kept out of vLLM's queue: readmitted at
    once it would take back the blocks its elders need, fork again, and no
    tree would finish."""

    root: str
    roots_finished: int  # trees finished when it was preempted
    arrival: float
    order: int


def ready(held: Sequence[Held], roots_finished: int, others_active: bool) -> list[Held]:
    """Held trees to readmit, oldest first: all once nothing else holds KV,
    else one, after some tree has finished since it was preempted."""
    if not others_active:
        out = list(held)
    else:
        out = [h for h in held if h.roots_finished < roots_finished][:1]
    return sorted(out, key=lambda h: (h.arrival, h.order))
