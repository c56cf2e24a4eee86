"""A fork: one Parallel block's Paths as branch requests, and their results."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from vllm_multiverse.tree.blocks import Block
from vllm_multiverse.tree.text_order import BranchResult, Cut, StopRule

BRANCH_TAG = "\x1fmv"  # in branch request ids: "{parent}\x1fmv{parallel_uid}.{path}"


def is_branch(request_id: str) -> bool:
    return BRANCH_TAG in request_id


@dataclass(eq=False)
class Fork:
    parent: str  # the request that forked (parked until the merge)
    parallel_uid: int  # the Parallel block's uid (its <Parallel> token's index)
    root: str
    client: str
    headers: tuple[tuple[int, ...], ...]  # one per Path; Path 1's with the lead
    prefix_len: int  # parent tokens through </Goal>
    lead_len: int
    rule: StopRule  # where the parent's text must stop
    concurrency: int  # branches that may run at once
    keep_logprobs: bool = False  # branches keep their logprobs for the merge
    pending: list[int] = field(default_factory=list)  # Paths not started yet
    running: dict[int, str] = field(default_factory=dict)  # Path -> branch id
    results: dict[int, BranchResult] = field(default_factory=dict)
    # The text in order, once decided (the fork is then queued for its merge).
    cut: Cut | None = None

    @property
    def num_paths(self) -> int:
        return len(self.headers)

    def branch_id(self, path: int) -> str:
        return f"{self.parent}{BRANCH_TAG}{self.parallel_uid}.{path}"

    def text_start(self, path: int) -> int:
        """Where a Path's own text starts in its branch's tokens (the lead
        is Path 1's alone)."""
        return self.prefix_len if path == 0 else self.prefix_len + self.lead_len

    def stashes(self) -> list[list[Block]]:
        return [r.blocks for r in self.results.values()]


class Caps(Protocol):
    """The engine options that bound a fork (``MultiverseConfig``)."""

    parallel: bool
    max_paths_per_fork: int
    max_depth: int
    max_branches_per_request: int


def concurrency(n: int, depth: int, live: int, cfg: Caps) -> tuple[int, bool]:
    """Paths of a fork that may run at once, and whether a cap said so: all
    of them, or one at a time beyond the engine's caps (the text is the same
    either way). ``live``: the client request's branches already running
    beside their siblings."""
    if not cfg.parallel:
        return 1, False
    if n > cfg.max_paths_per_fork or depth > cfg.max_depth or live + n > cfg.max_branches_per_request:
        return 1, True
    return n, False


def branch_seed(seed: int, parallel_uid: int, path: int) -> int:
    """A branch's own seed, a function of the request's seed, the block and
    the Path: running a Path again gives the same text."""
    return (seed * 1_000_003 + parallel_uid * 1_009 + path + 1) % (1 << 63)
