"""A fork's merge: its Paths' text in order joins the parent's sequence, and
their KV with it, never recomputed. The parent adopts branch 1's blocks and
fresh ones after them, into which the KV of Paths 2..N is copied token by
token (the copies run on the workers before the next forward)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from vllm_multiverse.tree.blocks import Block
from vllm_multiverse.tree.fork import Fork
from vllm_multiverse.tree.lifecycle import drop
from vllm_multiverse.tree.registry import Trees
from vllm_multiverse.tree.text_order import Cut


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Merge:
    parent: str
    cut: Cut  # the text the parent appends
    aborted: list[str]  # branches past the end of the text, for the host to abort
    num_computed: int | None  # the parent's tokens with KV after the splice; None: its text ended
    # What the client request has not been sent of it, with logprobs if
    # asked for; None where the parent is a branch (its text reaches the
    # client with its own fork's merge).
    client_text: tuple[list[int], list | None] | None


def ready(trees: Trees) -> Iterator[Fork]:
    """Forks whose text is decided, until none is left untried: a merge that
    finishes a branch can decide its own fork's text."""
    tried: set[int] = set()
    while todo := [f for f in trees.forks.values() if f.cut is not None and id(f) not in tried]:
        for fork in todo:
            tried.add(id(fork))
            # A merge before it may have preempted its tree to make room.
            if fork.cut is not None and trees.forks.get(fork.parent) is fork:
                yield fork


def _lengths(fork: Fork) -> tuple[int, int]:
    """Tokens with KV after the merge: through Path 1 (branch 1's own
    blocks), and through the last Path (copies included)."""
    n1 = fork.prefix_len + len(fork.results[0].tokens)
    return n1, n1 + sum(len(fork.results[k].tokens) for k in range(1, fork.num_paths))


def blocks_needed(trees: Trees, fork: Fork) -> int:
    """Fresh blocks the merge takes (none where the text ended)."""
    if fork.cut.end is not None:
        return 0
    n1, total = _lengths(fork)
    size = trees.blocks.block_size
    return max(0, cdiv(total, size) - cdiv(n1, size))


def merge(trees: Trees, fork: Fork) -> Merge:
    """Merge a fork whose text is decided; its fresh blocks
    (:func:`blocks_needed`) must be free."""
    cut = fork.cut
    del trees.forks[fork.parent]
    aborted = list(fork.running.values())  # Paths past the end of the text
    num_computed = None
    if cut.end is None:
        num_computed = _splice(trees, fork)
    drop(trees, fork)
    track = trees.tracks[fork.parent]
    track.extend(cut.tokens, cut.written)
    client_text = None
    if track.is_branch:
        if track.logprobs is not None:
            track.logprobs.extend(cut.logprobs or [None] * len(cut.tokens))
    else:
        sent = trees.live_sent.pop(fork.parent, 0)
        client_text = (cut.tokens[sent:], None if cut.logprobs is None else cut.logprobs[sent:])
    trees.stats["merges"] += 1
    return Merge(fork.parent, cut, aborted, num_computed, client_text)


def _splice(trees: Trees, fork: Fork) -> int:
    blocks = trees.blocks
    size = blocks.block_size
    r1 = fork.results[0]
    n1, total = _lengths(fork)
    own, spare = r1.blocks[: cdiv(n1, size)], r1.blocks[cdiv(n1, size) :]
    fresh = blocks.allocate(max(0, cdiv(total, size) - len(own)))
    if fresh is None:
        raise RuntimeError("merge without room: blocks_needed was not checked")
    table = own + fresh
    # Branch 1's full blocks are published under the same token hashes the
    # parent now has; copied KV equals the masked computation of the merged
    # tokens, so later blocks may be published as they fill.
    old = blocks.install(fork.parent, table, n1 // size)
    blocks.release((old + spare)[::-1])
    blocks.retain(fresh)

    def slots(table: list[Block], start: int, n: int) -> list[int]:
        ids = [blocks.block_id(b) for b in table[start // size : cdiv(start + n, size)]]
        first = start // size
        return [ids[i // size - first] * size + i % size for i in range(start, start + n)]

    copies: list[tuple[int, int]] = []
    dst = n1
    src = fork.prefix_len + fork.lead_len
    holds = [fresh]
    for k in range(1, fork.num_paths):
        res = fork.results[k]
        n = len(res.tokens)
        copies += zip(slots(res.blocks, src, n), slots(table, dst, n))
        dst += n
        holds.append(res.blocks)
    fork.results.clear()  # their blocks are the parent's table, released, or the copy queue's
    trees.copies.add(fork.parent, copies, holds)
    return total
