"""A small model of vLLM's V1 scheduler around the tree logic, for the
state-machine tests: a block pool with reference counts and a KV cache whose
slots remember which transcript token they hold, requests that compute their
tokens and sample the transcript's next token, and the same calls into
:class:`MultiverseState` that ``vllm032/scheduler.py`` makes.

A request's tokens map to indices of its transcript (the sequential text,
engine-written tokens included): a root's token i is transcript token i; a
branch's own tokens are a Path's, at an offset. Writing that index into
each computed slot lets a test check, after any interleaving, that every
request's KV holds exactly its own tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from toy_vocab import TOKENS

from vllm_multiverse.config import MultiverseConfig
from vllm_multiverse.structure import StructureConfig, analyze
from vllm_multiverse.tree import Act, Finish, MultiverseState, StopRule, is_branch
from vllm_multiverse.tree import pressure

LEAD = -1  # a branch's own "\n" before <Path> (Paths 2..N): in no transcript


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(eq=False)
class Block:
    block_id: int
    ref: int = 0


class FakePool:
    """BlockOps with a slot-addressed KV cache of transcript indices."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: list[Block] = list(self.blocks)
        self.tables: dict[str, list[Block]] = {}
        self.kv: dict[int, int] = {}  # slot -> transcript index

    # BlockOps
    def detach(self, rid):
        return self.tables.pop(rid)

    def install(self, rid, table, num_cached_blocks):
        old = self.tables[rid]
        self.tables[rid] = table
        return old

    def allocate(self, n):
        if n > len(self.free):
            return None
        out = [self.free.pop(0) for _ in range(n)]
        for b in out:
            assert b.ref == 0
            b.ref = 1
        return out

    def retain(self, blocks):
        for b in blocks:
            assert b.ref > 0
            b.ref += 1

    def release(self, blocks):
        for b in blocks:
            assert b.ref > 0, f"block {b.block_id} released below zero"
            b.ref -= 1
            if b.ref == 0:
                self.free.insert(0, b)  # LIFO, as vLLM reuses unhashed blocks

    def num_free(self):
        return len(self.free)

    @staticmethod
    def block_id(b):
        return b.block_id

    def freeable(self, request_ids, stashes):
        refs: dict[int, int] = {}
        for blocks in [self.tables.get(r, []) for r in request_ids] + list(stashes):
            for b in blocks:
                refs[b.block_id] = refs.get(b.block_id, 0) + 1
        return sum(1 for bid, n in refs.items() if self.blocks[bid].ref == n)

    # vLLM's side
    def share_prefix(self, parent_id, child_id, n) -> bool:
        B = self.block_size
        src = self.tables[parent_id][: cdiv(n, B)]
        partial = n % B != 0
        fresh = self.allocate(1) if partial else []
        if fresh is None:
            return False
        full = src[:-1] if partial else src
        self.retain(full)
        if partial:  # copy-on-write of the partial last block
            for off in range(n % B):
                self.kv[fresh[0].block_id * B + off] = self.kv[src[-1].block_id * B + off]
        self.tables[child_id] = full + fresh
        return True

    def grow(self, rid, num_tokens) -> bool:
        table = self.tables.setdefault(rid, [])
        more = cdiv(num_tokens, self.block_size) - len(table)
        got = self.allocate(max(0, more))
        if got is None:
            return False
        table.extend(got)
        return True

    def free_table(self, rid):
        self.release(self.tables.pop(rid, [])[::-1])

    def slot(self, rid, i):
        return self.tables[rid][i // self.block_size].block_id * self.block_size + i % self.block_size


@dataclass(eq=False)
class Req:
    rid: str
    tokens: list[int]
    max_tokens: int
    num_prompt: int
    transcript: list[int]
    # Transcript index of token i: own_start.. at offset; below, the parent's.
    offset: int = 0
    own_start: int = 0
    lead: range = range(0)
    parent: Req | None = None
    computed: int = 0
    status: str = "waiting"  # waiting | running | parked | held | finished
    finish: Finish | None = None
    stop_reason: object = None

    def tindex(self, i: int) -> int:
        if i >= self.own_start:
            return self.offset + i
        if i in self.lead:
            return LEAD
        return self.parent.tindex(i)

    def next_token(self) -> int:
        j = self.offset + len(self.tokens)
        return self.transcript[j] if j < len(self.transcript) else TOKENS.think_open

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.num_prompt


class FakeEngine:
    def __init__(self, num_blocks: int, block_size: int, config: MultiverseConfig | None = None) -> None:
        self.pool = FakePool(num_blocks, block_size)
        self.mv = MultiverseState(TOKENS, StructureConfig(), config or MultiverseConfig(), self.pool)
        self.reqs: dict[str, Req] = {}
        self.running: list[str] = []
        self.waiting: list[str] = []
        self.paused = False
        self.results: dict[str, Req] = {}  # finished roots
        self.stop_ids: dict[str, frozenset[int]] = {}
        self._to_fork: list[str] = []
        self._merged_into: dict[int, str] = {}  # block -> the request a merge copies into

    # -- client side -----------------------------------------------------

    def add(self, rid: str, transcript: list[int], prompt_len: int, max_tokens: int, stop_ids=frozenset()) -> None:
        req = Req(rid, list(transcript[:prompt_len]), max_tokens, prompt_len, transcript)
        self.reqs[rid] = req
        self.stop_ids[rid] = frozenset(stop_ids)
        self.mv.add(rid, req.tokens, sequential=False)
        self.waiting.append(rid)

    def abort(self, ids) -> None:
        self.finish(set(ids), Finish.ABORTED)

    def abort_all(self) -> None:
        for rid in self.mv.clear():
            self.reqs[rid].status = "waiting"
        self.finish(set(self.reqs), Finish.ABORTED, expand=False)

    # -- vLLM's side ---------------------------------------------------------

    def finish(self, ids, finish: Finish, expand: bool = True) -> None:
        if expand:
            self.mv.unhold(ids)
            ids = self.mv.abort(ids)
        for rid in ids:
            req = self.reqs.get(rid)
            if req is None or req.status == "finished":
                continue
            req.status, req.finish = "finished", finish
            self._free(req)

    def _free(self, req: Req) -> None:
        for q in (self.running, self.waiting):
            if req.rid in q:
                q.remove(req.rid)
        if not self.mv.finished(req.rid, req.tokens, req.finish, req.stop_reason):
            self.pool.free_table(req.rid)
        del self.reqs[req.rid]
        if not is_branch(req.rid):
            self.results[req.rid] = req

    def _preempt(self, rid: str) -> None:
        req = self.reqs[rid]
        self.pool.free_table(rid)
        req.computed = 0
        req.status = "waiting"
        self.waiting.insert(0, rid)
        self.mv.preempted(rid)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self.mv.forks or self.mv.held)

    def step(self) -> None:
        for rid in reversed(self.mv.release_held(others_active=bool(self._active_roots()))):
            self.reqs[rid].status = "waiting"
            self.waiting.insert(0, rid)
        self._relieve_pressure()
        scheduled = self._schedule()
        holding = any(self.reqs[r].computed for r in self.waiting)
        if not scheduled and (holding or self.mv.forks or (self.waiting and not self.paused)):
            self._give_back_memory()
        ends = {rid: end for rid, _, end in scheduled}
        step = self.mv.step({rid: end - start for rid, start, end in scheduled}, ends.__getitem__)
        # The workers: merge copies first, then this step's KV writes. A
        # copy may only write a block of the request it merged into.
        B = self.pool.block_size
        for src, dst in step.kv_copies:
            owners = {r for r, t in self.pool.tables.items() if any(b.block_id == dst // B for b in t)}
            assert owners <= {self._merged_into[dst // B]}, f"a merge copy writes a block of {owners}"
            self.pool.kv[dst] = self.pool.kv[src]
        self._merged_into.clear()
        for rid, start, end in scheduled:
            req = self.reqs[rid]
            for i in range(start, end):
                self.pool.kv[self.pool.slot(rid, i)] = req.tindex(i)
        for rid, _, end in scheduled:
            req = self.reqs.get(rid)
            if req is not None and req.status == "running" and end == len(req.tokens):
                self._sampled(req)
        self.mv.copies.step_done()
        for rid in self._to_fork:
            self._fork(self.reqs[rid])
        self._to_fork = []
        self.mv.launch_pending(self._start_branch)
        for fork in self.mv.ready_to_merge():
            self._merge(fork)

    def _schedule(self) -> list[tuple[str, int, int]]:
        scheduled = []
        for rid in list(self.running):
            if rid not in self.running:
                continue  # preempted for an earlier one in this step
            req = self.reqs[rid]
            while not self.pool.grow(rid, len(req.tokens)):
                victim = self.running[-1]  # vLLM preempts its newest running request
                self.running.remove(victim)
                self._preempt(victim)
                if victim == rid:
                    break
            else:
                scheduled.append((rid, req.computed, len(req.tokens)))
                req.computed = len(req.tokens)
        for rid in list(self.waiting):
            req = self.reqs[rid]
            if self.paused and req.computed == 0:
                continue  # PAUSED_NEW admits only requests holding KV
            if not self.pool.grow(rid, len(req.tokens)):
                break
            self.waiting.remove(rid)
            self.running.append(rid)
            req.status = "running"
            scheduled.append((rid, req.computed, len(req.tokens)))
            req.computed = len(req.tokens)
        return scheduled

    # -- the scheduler hooks, as vllm032/scheduler.py makes them ------------

    def _sampled(self, req: Req) -> None:
        track = self.mv.tracks[req.rid]
        if track.draining:
            return self._stop(req, Finish.STOPPED)
        if track.engine_due:
            track.engine_due = False
            ev = track.state.event
            if track.act(ev) is Act.FORK:
                self._to_fork.append(req.rid)
                return
            return self._write(req, track, ev.write)
        tok = req.next_token()
        req.tokens.append(tok)
        ev = track.append(tok)
        root = req.rid.split("\x1f")[0]
        if tok in self.stop_ids.get(root, ()):
            req.stop_reason = tok
            return self._stop(req, Finish.STOPPED)
        if req.num_output >= req.max_tokens:
            return self._stop(req, Finish.LENGTH)
        act = track.act(ev)
        if act is Act.FORK:
            self._to_fork.append(req.rid)
        elif act is Act.END_PATH:
            track.draining = True
        elif act is Act.WRITE:
            self._write(req, track, ev.write)

    def _write(self, req: Req, track, tokens) -> None:
        """The sequential layer's headers (a prompt that holds a block)."""
        for tok in tokens:
            assert tok == req.next_token(), "the transcript holds the written tokens"
            req.tokens.append(tok)
            track.append(tok, written=True)
            if req.num_output >= req.max_tokens:
                return self._stop(req, Finish.LENGTH)

    def _stop(self, req: Req, finish: Finish) -> None:
        req.status, req.finish = "finished", finish
        self._free(req)

    def _fork(self, req: Req) -> None:
        root = req.rid.split("\x1f")[0]
        budget = req.max_tokens - req.num_output
        self.mv.fork(req.rid, StopRule(budget, self.stop_ids.get(root, frozenset())))
        self.running.remove(req.rid)
        req.status = "parked"

    def _start_branch(self, fork, k, bid, header) -> bool:
        parent = self.reqs[fork.parent]
        if not self.pool.share_prefix(parent.rid, bid, parent.computed):
            return False
        # The Path's <Path> in the transcript: spans of the block, in order.
        block_t = parent.tindex(fork.block_uid)
        spans = [s for s in analyze(parent.transcript, TOKENS).spans if s.block == block_t]
        lead = len(TOKENS.path_header_lead)
        own = fork.prefix_len + (0 if k == 0 else lead)
        child = Req(
            bid,
            parent.tokens + list(header),
            max(1, fork.rule.budget - len(header)),
            fork.prefix_len + len(header),
            parent.transcript,
            offset=spans[k].start - lead - fork.prefix_len,
            own_start=own,
            lead=range(fork.prefix_len, own),
            parent=parent,
            computed=parent.computed,
        )
        self.reqs[bid] = child
        self.waiting.append(bid)
        return True

    def _merge(self, fork) -> None:
        need = self.mv.blocks_needed(fork)
        if need and not self._make_room(need, fork):
            return
        parent = self.reqs[fork.parent]
        merge = self.mv.merge(fork)
        if merge.aborted:
            self.finish(merge.aborted, Finish.ABORTED)
        parent.tokens += merge.cut.tokens
        if merge.cut.end is not None:
            parent.stop_reason = merge.cut.end.stop_reason
            return self._stop(parent, merge.cut.end.finish)
        parent.computed = merge.num_computed
        self._merged_into.update((b.block_id, parent.rid) for b in self.pool.tables[parent.rid])
        parent.status = "waiting"
        self.waiting.append(parent.rid)

    def _active_roots(self) -> list[str]:
        roots = {self.mv.tracks[r].root: None for r in self.running}
        roots.update((f.root, None) for f in self.mv.forks.values())
        return list(roots)

    def _candidates(self, roots):
        return self.mv.candidates(roots, lambda r: 0, lambda r: 0.0)

    def _blocks_short(self) -> int:
        need = sum(
            max(0, cdiv(self.reqs[r].computed + 1, self.pool.block_size) - len(self.pool.tables.get(r, [])))
            for r in self.running
        )
        return need - self.pool.num_free()

    def _relieve_pressure(self) -> None:
        if not self.mv.forks:
            return
        while self._blocks_short() > 0:
            roots = self._active_roots()
            if len(roots) < 2:
                return
            self.preempt_tree(pressure.victim(self._candidates(roots), "fcfs").root)

    def _give_back_memory(self) -> None:
        roots = self._active_roots()
        if len(roots) >= 2:
            self.preempt_tree(pressure.victim(self._candidates(roots), "fcfs").root)
            return
        branches = self.mv.roll_back_newest_fork()
        if branches is not None:
            self.finish(branches, Finish.ABORTED)

    def preempt_tree(self, root: str) -> None:
        assert root in self._active_roots(), "only a running or parked tree is preempted"
        branches = self.mv.preempt_tree(root)
        self.finish(branches, Finish.ABORTED)
        req = self.reqs[root]
        if root in self.running:
            self.running.remove(root)
        self.pool.free_table(root)
        req.computed = 0
        self.mv.preempted(root)
        req.status = "held"
        self.mv.hold(root, 0.0)

    def _make_room(self, blocks: int, fork) -> bool:
        deficit = blocks - self.pool.num_free()
        if deficit <= 0:
            return True
        roots = [r for r in self._active_roots() if r != fork.root]
        victims = pressure.victims_for(
            deficit, self._candidates(roots), lambda r: self.pool.freeable(*self.mv.tree_holdings(r)), "fcfs"
        )
        if victims is None:
            return False
        for v in victims:
            self.preempt_tree(v.root)
        return self.pool.num_free() >= blocks

    # -- checks --------------------------------------------------------------

    def check(self) -> None:
        """Reference counts equal the tables and stashes holding each block,
        and every request's computed KV is its own tokens."""
        holders: dict[int, int] = {}
        for blocks in list(self.pool.tables.values()) + self.mv.held_blocks():
            for b in blocks:
                holders[b.block_id] = holders.get(b.block_id, 0) + 1
        for b in self.pool.blocks:
            assert b.ref == holders.get(b.block_id, 0), f"block {b.block_id}: ref {b.ref}, held {holders.get(b.block_id, 0)}"
        assert len(self.pool.free) == sum(1 for b in self.pool.blocks if b.ref == 0)
        for rid, req in self.reqs.items():
            if req.computed == 0 or rid not in self.pool.tables or rid in self.mv.copies:
                continue  # nothing computed, or its merge copies not run yet
            got = [self.pool.kv.get(self.pool.slot(rid, i)) for i in range(req.computed)]
            want = [req.tindex(i) for i in range(req.computed)]
            assert got == want, f"KV of {rid!r} is not its own tokens"
        assert set(self.mv.tracks) == set(self.reqs)
