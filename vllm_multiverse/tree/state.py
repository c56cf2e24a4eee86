"""``MultiverseState``: every request tree of one engine.

The scheduler layer tells it what vLLM did (a request added, tokens
appended, a request finished or preempted) and asks it what to do (fork,
launch, merge, preempt); the state does all the block bookkeeping of forks
and merges itself, through :class:`BlockOps`. Invariant: every reference it
holds is in a branch result (a finished Path waiting for its merge) or in
the copy queue, and it holds nothing once no request is left.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from vllm_multiverse.structure import MultiverseTokens, StructureConfig, StructureState
from vllm_multiverse.tree import pressure
from vllm_multiverse.tree.blocks import Block, BlockOps
from vllm_multiverse.tree.copies import CopyQueue
from vllm_multiverse.tree.fork import BranchResult, Fork, concurrency
from vllm_multiverse.tree.step import MultiverseStep
from vllm_multiverse.tree.text_order import Cut, End, Finish, StopRule, text_in_order
from vllm_multiverse.tree.track import Track

STAT_NAMES = ("forks", "merges", "fallbacks", "rollbacks", "parallel_tokens", "preemptions", "masked_tokens")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Merge:
    cut: Cut
    aborted: list[str]  # branches past the end of the text, for the host to abort
    num_computed: int | None  # the parent's tokens with KV after the splice; None: text ended


class MultiverseState:
    def __init__(self, tokens: MultiverseTokens, structure: StructureConfig, config, blocks: BlockOps) -> None:
        self.tokens = tokens
        self.structure = structure
        self.config = config  # MultiverseConfig: the caps
        self.blocks = blocks
        self.tracks: dict[str, Track] = {}
        self.forks: dict[str, Fork] = {}  # parent request id -> its open fork
        self.held: list[pressure.Held] = []
        self.copies = CopyQueue(blocks)
        self.stats: Counter[str] = Counter({name: 0 for name in STAT_NAMES})
        self.paths_per_fork: Counter[int] = Counter()
        self.roots_finished = 0
        self._order = itertools.count()

    # -- requests ------------------------------------------------------------

    def add(
        self,
        request_id: str,
        prompt: Sequence[int],
        *,
        sequential: bool,
        client: str | None = None,
        seed: int | None = None,
    ) -> Track:
        track = Track(
            StructureState(self.tokens, self.structure),
            root=request_id,
            client=client or request_id,
            order=next(self._order),
            sequential=sequential,
            seed=seed,
        )
        track.extend(prompt)
        track.arm()
        self.tracks[request_id] = track
        return track

    def preempted(self, request_id: str) -> None:
        """vLLM freed the request's KV; it recomputes it from its tokens."""
        self.stats["preemptions"] += 1
        self.copies.drop(request_id)
        track = self.tracks.get(request_id)
        if track is not None:
            track.arm()  # a parent preempted at its fork forks again

    def finished(self, request_id: str, tokens: Sequence[int], finish: Finish, stop_reason=None) -> bool:
        """vLLM is freeing a finished request. True if the tree took its
        blocks (a branch whose Path ended, waiting for its merge)."""
        self.copies.drop(request_id)
        track = self.tracks.pop(request_id, None)
        if track is None:
            return False
        fork = track.fork
        if fork is None:
            self.roots_finished += 1
            return False
        k = track.index
        if self.forks.get(fork.parent) is not fork or fork.running.get(k) != request_id:
            return False  # the tree dropped it first (an abort, a preemption, a merge)
        del fork.running[k]
        # At its tail the Path is complete; any other end is where the text ends.
        end = None if finish is Finish.STOPPED and track.draining else End(finish, stop_reason)
        if finish is Finish.ABORTED:
            # Aborted alone (by vLLM, not with its tree): run the Path again.
            fork.pending = sorted([*fork.pending, k])
            return False
        start = fork.text_start(k)
        rows = track.tail_rows(len(track) - start)
        fork.results[k] = BranchResult(
            request_id=request_id,
            tokens=list(tokens[start:]),
            written=bytes(track.written[start:]),
            blocks=self.blocks.detach(request_id),
            end=end,
            rows=rows if rows is not None and len(rows) == len(tokens) - start else None,
        )
        if not fork.merging and text_in_order(fork, fork.rule, self.tokens.conclusion_header) is not None:
            fork.merging = True
        return True

    # -- fork ----------------------------------------------------------------

    def fork(self, parent_id: str, rule: StopRule, keep_rows: bool = False) -> Fork:
        """The parent has sampled a </Goal> that opens Paths: park it."""
        track = self.tracks[parent_id]
        ev = track.state.event
        n = len(ev.branch_headers)
        live = sum(
            len(f.running) + len(f.pending)
            for f in self.forks.values()
            if f.client == track.client and f.concurrency > 1
        )
        conc, capped = concurrency(n, ev.depth, live, self.config)
        self.stats["fallbacks"] += capped
        fork = Fork(
            parent=parent_id,
            block_uid=ev.block,
            root=track.root,
            client=track.client,
            headers=ev.branch_headers,
            prefix_len=len(track),
            lead_len=len(self.tokens.path_header_lead),
            rule=rule,
            concurrency=conc,
            keep_rows=keep_rows,
            pending=list(range(n)),
        )
        self.forks[parent_id] = fork
        self.stats["forks"] += 1
        self.paths_per_fork[n] += 1
        return fork

    def launch_pending(self, start) -> None:
        """Start the Paths that may run now. ``start(fork, k, branch_id,
        header)`` makes the branch request on the parent's blocks, False if
        its KV does not fit yet (then try again after the next step)."""
        for fork in list(self.forks.values()):
            while fork.pending and not fork.merging and len(fork.running) < fork.concurrency:
                k = fork.pending[0]
                bid = fork.branch_id(k)
                header = fork.headers[k]
                if not start(fork, k, bid, header):
                    break
                fork.pending.pop(0)
                fork.running[k] = bid
                self.tracks[bid] = self.tracks[fork.parent].branch(fork, k, header)

    # -- merge ---------------------------------------------------------------

    def ready_to_merge(self) -> Iterator[Fork]:
        """Forks whose text is decided, until none is left untried: a merge
        that finishes a branch can decide its own fork's text."""
        tried: set[int] = set()
        while todo := [f for f in self.forks.values() if f.merging and id(f) not in tried]:
            for fork in todo:
                tried.add(id(fork))
                # A merge before it may have preempted its tree to make room.
                if fork.merging and self.forks.get(fork.parent) is fork:
                    yield fork

    def cut(self, fork: Fork) -> Cut:
        cut = text_in_order(fork, fork.rule, self.tokens.conclusion_header)
        assert cut is not None
        return cut

    def merged_lengths(self, fork: Fork) -> tuple[int, int]:
        """Tokens with KV after the merge: through Path 1 (branch 1's own
        blocks), and through the last Path (copies included)."""
        n1 = fork.prefix_len + len(fork.results[0].tokens)
        return n1, n1 + sum(len(fork.results[k].tokens) for k in range(1, fork.num_paths))

    def blocks_needed(self, fork: Fork) -> int:
        if self.cut(fork).end is not None:
            return 0
        n1, total = self.merged_lengths(fork)
        B = self.blocks.block_size
        return max(0, cdiv(total, B) - cdiv(n1, B))

    def live_text(
        self, root: str, all_tokens: Callable[[str], Sequence[int]], sent: int = 0
    ) -> tuple[list[int], list | None]:
        """The text after ``root``'s own tokens that text order has decided
        while its fork decodes, from token ``sent`` of it on, with its
        logprob rows if the fork keeps them (None where the engine wrote
        the token): Path 1 (first in text order, with its header) as far as
        it has been decoded, and inside it, Path 1 of Path 1's own fork, and
        so on. ``all_tokens``: a running branch's tokens, its prompt
        included. What follows Path 1 is decided at the merge."""
        fork = self.forks.get(root)
        tokens: list[int] = []
        rows: list | None = [] if fork is not None and fork.keep_rows else None
        offset = 0  # where the current level's text starts in the live text
        while fork is not None:
            result = fork.results.get(0)
            if result is not None:
                skip = max(0, sent - offset)
                new = result.tokens[skip:]
                tokens += new
                if rows is not None:
                    rows += result.rows[skip:] if result.rows is not None else [None] * len(new)
                break
            branch = fork.running.get(0)
            if branch is None:
                break
            text = all_tokens(branch)
            n = len(text) - fork.prefix_len
            skip = min(n, max(0, sent - offset))
            tokens += text[fork.prefix_len + skip :]
            if rows is not None:
                rows += self.tracks[branch].tail_rows(n, skip) or [None] * (n - skip)
            offset += n
            fork = self.forks.get(branch)
        return tokens, rows

    def merge(self, fork: Fork) -> Merge:
        """Merge a fork whose text is decided (its blocks, when it goes on,
        must be free: see :meth:`blocks_needed`)."""
        cut = self.cut(fork)
        del self.forks[fork.parent]
        aborted = list(fork.running.values())  # Paths past the end of the text
        fork.running.clear()
        fork.pending.clear()
        num_computed = None
        if cut.end is None:
            num_computed = self._splice(fork)
        else:
            self._drop_results(fork)
        track = self.tracks[fork.parent]
        track.extend(cut.tokens, cut.written)
        if track.fork is not None and track.rows is not None:
            track.rows.extend(cut.rows or [None] * len(cut.tokens))
        self.stats["merges"] += 1
        return Merge(cut, aborted, num_computed)

    def _splice(self, fork: Fork) -> int:
        """The parent takes branch 1's blocks and fresh ones after them, into
        which the KV of Paths 2..N is copied token by token."""
        B = self.blocks.block_size
        r1 = fork.results[0]
        n1, total = self.merged_lengths(fork)
        own, spare = r1.blocks[: cdiv(n1, B)], r1.blocks[cdiv(n1, B) :]
        fresh = self.blocks.allocate(max(0, cdiv(total, B) - len(own)))
        if fresh is None:
            raise RuntimeError("merge without room: blocks_needed was not checked")
        table = own + fresh
        # Branch 1's full blocks are published under the same token hashes
        # the parent now has; copied KV equals the masked computation of the
        # merged tokens, so later blocks may be published as they fill.
        old = self.blocks.install(fork.parent, table, n1 // B)
        self.blocks.release((old + spare)[::-1])
        self.blocks.retain(fresh)
        bid = self.blocks.block_id

        def slot(blocks: list[Block], i: int) -> int:
            return bid(blocks[i // B]) * B + i % B

        copies = []
        dst = n1
        src_start = fork.prefix_len + fork.lead_len
        holds = [fresh]
        for k in range(1, fork.num_paths):
            res = fork.results[k]
            copies += [(slot(res.blocks, src_start + j), slot(table, dst + j)) for j in range(len(res.tokens))]
            dst += len(res.tokens)
            holds.append(res.blocks)
        fork.results.clear()
        self.copies.add(fork.parent, copies, holds)
        return total

    def _drop_results(self, fork: Fork) -> None:
        for res in fork.results.values():
            self.blocks.release(res.blocks[::-1])
        fork.results.clear()

    # -- aborts and pressure ---------------------------------------------------

    def abort(self, request_ids: Iterable[str]) -> set[str]:
        """The requests to finish for these: a parent takes its whole tree of
        branches with it. The forks' stashed Paths are released here."""
        ids = set(request_ids)
        todo = list(ids)
        while todo:
            rid = todo.pop()
            self.copies.drop(rid)
            fork = self.forks.pop(rid, None)
            if fork is None:
                continue
            ids.update(fork.running.values())
            todo.extend(fork.running.values())
            self._drop(fork)
        return ids

    def unhold(self, request_ids: Iterable[str]) -> list[str]:
        ids = set(request_ids)
        out = [h.root for h in self.held if h.root in ids]
        self.held = [h for h in self.held if h.root not in ids]
        return out

    def clear(self) -> list[str]:
        """Everything goes (vLLM's finish_requests(None)); returns the held
        roots, for the host to finish too."""
        for fork in self.forks.values():
            self._drop(fork)
        self.forks.clear()
        self.copies.drop_all()
        held, self.held = [h.root for h in self.held], []
        return held

    def _drop(self, fork: Fork) -> None:
        self._drop_results(fork)
        fork.running.clear()
        fork.pending.clear()
        fork.merging = False

    def tree_forks(self, root: str) -> list[Fork]:
        return [f for f in self.forks.values() if f.root == root]

    def preempt_tree(self, root: str) -> list[str]:
        """Drop every fork of a tree; returns its branches, for the host to
        abort (the root itself it preempts)."""
        branches: list[str] = []
        for fork in self.tree_forks(root):
            del self.forks[fork.parent]
            branches += fork.running.values()
            self._drop(fork)
        return branches

    def hold(self, root: str, arrival: float) -> None:
        self.held.append(pressure.Held(root, self.roots_finished, arrival, self.tracks[root].order))

    def release_held(self, others_active: bool) -> list[str]:
        ready = pressure.ready(self.held, self.roots_finished, others_active)
        self.held = [h for h in self.held if h not in ready]
        return [h.root for h in ready]

    def roll_back_newest_fork(self) -> list[str] | None:
        """Drop the work of the newest fork that has any, to run its Paths one
        at a time; returns its branches for the host to abort. Branch tokens
        are a function of the branch (greedy, or its own seed), so running
        them again gives the same text."""
        for fork in reversed(list(self.forks.values())):
            if fork.merging or (not fork.running and not fork.results):
                continue
            branches = list(fork.running.values())
            self._drop(fork)
            fork.pending = list(range(fork.num_paths))
            fork.concurrency = 1
            self.stats["rollbacks"] += 1
            return branches
        return None

    def candidates(self, roots: Iterable[str], priority, arrival) -> list[pressure.Candidate]:
        return [pressure.Candidate(r, priority(r), arrival(r), self.tracks[r].order) for r in roots]

    def tree_holdings(self, root: str) -> tuple[list[str], list[list[Block]]]:
        """The tables (request ids) and stashes of one tree."""
        forks = self.tree_forks(root)
        ids = [root] + [b for f in forks for b in f.running.values()]
        return ids, [s for f in forks for s in f.stashes()]

    # -- steps ---------------------------------------------------------------

    def step(self, scheduled: Mapping[str, int], computed: Callable[[str], int]) -> MultiverseStep:
        """Positions and masks of the scheduled token ranges, and the queued
        copies. ``scheduled``: request -> how many tokens the step computes,
        the last of those it has KV for after the step; ``computed(request)``:
        how many it has KV for after the step (asked only of requests that
        need positions or masks)."""
        step = MultiverseStep()
        tracks = self.tracks
        for rid, n in scheduled.items():
            track = tracks.get(rid)
            # A request that has never been in a Path has no hidden ranges,
            # and none shifted: nothing to send (most requests, most steps).
            if track is None or not (track.hidden or track.run_delta or track.run_start):
                continue
            end = computed(rid)
            start = end - n
            if track.hidden:
                rects = track.rects_for(start, end)
                if rects:
                    step.masks[rid] = rects
                    self.stats["masked_tokens"] += n
            pos = track.positions_for(start, end)
            if pos is not None:
                step.positions[rid] = pos
        step.kv_copies = self.copies.take()
        return step

    def leftovers(self) -> dict[str, int]:
        """What the state still keeps (empty once no request is left)."""
        sizes = {
            "tracks": len(self.tracks),
            "forks": len(self.forks),
            "held": len(self.held),
            "copies": int(bool(self.copies)),
        }
        return {k: v for k, v in sizes.items() if v}

    def held_blocks(self) -> list[list[Block]]:
        """Every block list the state holds references on."""
        return [s for f in self.forks.values() for s in f.stashes()] + self.copies.holds()
