"""A fork: one Parallel block's Paths as branch requests, and their results."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm_multiverse.tree.blocks import Block
from vllm_multiverse.tree.text_order import End, StopRule

BRANCH_TAG = "\x1fmv"  # in branch request ids: "{parent}\x1fmv{block}.{path}"


def is_branch(request_id: str) -> bool:
    return BRANCH_TAG in request_id


@dataclass(eq=False)
class BranchResult:
    request_id: str
    tokens: list[int]  # the Path's text (Path 1's with the shared lead)
    written: bytes  # 1 where the engine wrote tokens[i]
    blocks: list[Block]  # its KV, still referenced: the tree's stash
    end: End | None  # None: ended at its tail; else where and why the text ends
    rows: list | None  # logprob rows (None where written), if asked for


@dataclass(eq=False)
class Fork:
    parent: str  # the request that forked (parked until the merge)
    block_uid: int
    root: str
    client: str
    headers: tuple[tuple[int, ...], ...]  # one per Path; Path 1's with the lead
    prefix_len: int  # parent tokens through </Goal>
    lead_len: int
    rule: StopRule  # where the parent's text must stop
    concurrency: int  # branches that may run at once
    keep_rows: bool = False  # logprobs asked for: branches keep their rows
    pending: list[int] = field(default_factory=list)  # Paths not started yet
    running: dict[int, str] = field(default_factory=dict)  # Path -> branch id
    results: dict[int, BranchResult] = field(default_factory=dict)
    merging: bool = False  # its text is decided: queued for its merge

    @property
    def num_paths(self) -> int:
        return len(self.headers)

    def branch_id(self, k: int) -> str:
        return f"{self.parent}{BRANCH_TAG}{self.block_uid}.{k}"

    def text_start(self, k: int) -> int:
        """Where Path k's own text starts in its branch's tokens (the lead
        is Path 1's alone)."""
        return self.prefix_len if k == 0 else self.prefix_len + self.lead_len

    def stashes(self) -> list[list[Block]]:
        return [r.blocks for r in self.results.values()]


def concurrency(n: int, depth: int, live: int, cfg) -> tuple[int, bool]:
    """Paths of a fork that may run at once, and whether a cap said so: all
    of them, or one at a time beyond the engine's caps (the text is the same
    either way). ``live``: the client request's branches already running
    beside their siblings."""
    if not cfg.parallel:
        return 1, False
    if n > cfg.max_paths_per_fork or depth > cfg.max_depth or live + n > cfg.max_branches_per_request:
        return 1, True
    return n, False


def branch_seed(seed: int, block_uid: int, k: int) -> int:
    """A branch's own seed, a function of the request's seed, the block and
    the Path: running a Path again gives the same text."""
    return (seed * 1_000_003 + block_uid * 1_009 + k + 1) % (1 << 63)
