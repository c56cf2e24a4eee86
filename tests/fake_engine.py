"""A small fake of vLLM's V1 scheduler and workers around the real Multiverse
policy, for the state-machine tests: a block pool with reference counts and a
KV cache whose slots remember which transcript token they hold, requests that
compute their tokens and sample the transcript's next token, vLLM's own
preemption, queues and stop checks. Every decision is the policy's
(:mod:`vllm_multiverse.tree`), called as ``vllm032/scheduler.py`` calls it;
this file only carries the decisions out.

A request's tokens map to indices of its transcript (the sequential text,
engine-written tokens included): a root's token i is transcript token i; a
branch's own tokens are a Path's, at an offset. Writing that index into
each computed slot lets a test check, after any interleaving, that every
request's KV holds exactly its own tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from toy_vocab import TOKENS
from tree_checks import held_blocks

from vllm_multiverse.config import MultiverseConfig
from vllm_multiverse.structure import StructureConfig, analyze
from vllm_multiverse.tree import Finish, Limits, Trees, is_branch, lifecycle, merge, pressure, sampling
from vllm_multiverse.tree import step as tree_step

LEAD = -1  # a branch's own "\n" before <Path> (Paths 2..N): in no transcript
POLICY = "fcfs"


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(eq=False)
class Block:
    block_id: int
    ref: int = 0


class FakePool:
    """BlockOps with a slot-addressed KV cache of transcript indices."""

    def __init__(self, num_blocks: int, block_size: int, reqs: dict) -> None:
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: list[Block] = list(self.blocks)
        self.tables: dict[str, list[Block]] = {}
        self.kv: dict[int, int] = {}  # slot -> transcript index
        self._reqs = reqs

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

    def blocks_short(self, running):
        need = sum(
            max(0, cdiv(self._reqs[r].computed + 1, self.block_size) - len(self.tables.get(r, []))) for r in running
        )
        return need - len(self.free)

    # vLLM's side
    def share_prefix(self, parent_id, child_id, n) -> bool:
        size = self.block_size
        src = self.tables[parent_id][: cdiv(n, size)]
        partial = n % size != 0
        fresh = self.allocate(1) if partial else []
        if fresh is None:
            return False
        full = src[:-1] if partial else src
        self.retain(full)
        if partial:  # copy-on-write of the partial last block
            for off in range(n % size):
                self.kv[fresh[0].block_id * size + off] = self.kv[src[-1].block_id * size + off]
        self.tables[child_id] = full + fresh
        return True

    def grow(self, rid, num_tokens) -> bool:
        table = self.tables.setdefault(rid, [])
        got = self.allocate(max(0, cdiv(num_tokens, self.block_size) - len(table)))
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
    stop_ids: frozenset[int] = frozenset()
    # Transcript index of token i: own_start.. at offset; below, the parent's.
    offset: int = 0
    own_start: int = 0
    lead: range = field(default=range(0))
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
        self.reqs: dict[str, Req] = {}
        self.pool = FakePool(num_blocks, block_size, self.reqs)
        self.trees = Trees(TOKENS, StructureConfig(), config or MultiverseConfig(), self.pool, max_model_len=1 << 20)
        self.running: list[str] = []
        self.waiting: list[str] = []
        self.paused = False
        self.results: dict[str, Req] = {}  # finished roots
        self._parked: list[str] = []
        self._merged_into: dict[int, str] = {}  # block -> the request a merge copies into

    # -- client side -----------------------------------------------------

    def add(self, rid: str, transcript: list[int], prompt_len: int, max_tokens: int, stop_ids=frozenset()) -> None:
        req = Req(rid, list(transcript[:prompt_len]), max_tokens, prompt_len, transcript, frozenset(stop_ids))
        self.reqs[rid] = req
        self.trees.add(rid, req.tokens, Limits(max_tokens, req.stop_ids), sequential=False)
        self.waiting.append(rid)

    def abort(self, ids) -> None:
        self.finish(set(ids), Finish.ABORTED)

    def abort_all(self) -> None:
        for rid in lifecycle.abort_all(self.trees):
            self.reqs[rid].status = "waiting"
        self.finish(set(self.reqs), Finish.ABORTED, expand=False)

    def active_roots(self) -> list[str]:
        return pressure.active_roots(self.trees, self.running)

    # -- vLLM's side ---------------------------------------------------------

    def finish(self, ids, finish: Finish, expand: bool = True) -> None:
        if expand:
            pressure.unhold(self.trees, ids)
            ids = lifecycle.abort(self.trees, ids)
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
        if not lifecycle.finished(self.trees, req.rid, req.finish, req.stop_reason):
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
        self.trees.preempted(rid)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self.trees.forks or self.trees.held)

    def step(self) -> None:
        trees = self.trees
        for rid in reversed(pressure.release_held(trees, self.running)):
            self.reqs[rid].status = "waiting"
            self.waiting.insert(0, rid)
        if trees.forks:
            while (root := pressure.to_relieve(trees, self.running, POLICY)) is not None:
                self.preempt_tree(root)
        scheduled = self._schedule()
        holding = any(self.reqs[r].computed for r in self.waiting)
        if not scheduled and (holding or trees.forks or (self.waiting and not self.paused)):
            self._give_back_memory()
        ends = {rid: end for rid, _, end in scheduled}
        step = tree_step.build(trees, {rid: end - start for rid, start, end in scheduled}, ends.__getitem__)
        # The workers: merge copies first, then this step's KV writes. A
        # copy may only write a block of the request it merged into.
        size = self.pool.block_size
        for src, dst in step.kv_copies:
            owners = {r for r, t in self.pool.tables.items() if any(b.block_id == dst // size for b in t)}
            assert owners <= {self._merged_into[dst // size]}, f"a merge copy writes a block of {owners}"
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
        trees.copies.step_done()
        for rid in self._parked:
            self.running.remove(rid)
            self.reqs[rid].status = "parked"
        self._parked = []
        for launches in lifecycle.launch_plan(trees):
            for launch in launches:
                if not self._start_branch(launch):
                    break
                lifecycle.launched(trees, launch)
        for fork in merge.ready(trees):
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

    def _sampled(self, req: Req) -> None:
        """vLLM's update of a request with its sampled token."""
        action = sampling.before_sample(self.trees, req.rid)
        if action is not None:
            return self._carry_out(req, action)
        tok = req.next_token()
        req.tokens.append(tok)
        # vLLM's stop check
        stop = Finish.STOPPED if tok in req.stop_ids else Finish.LENGTH if req.num_output >= req.max_tokens else None
        action = sampling.on_token(self.trees, req.rid, tok, stopped=stop is not None)
        if stop is not None:
            if stop is Finish.STOPPED:
                req.stop_reason = tok
            return self._stop(req, stop)
        if action is not None:
            self._carry_out(req, action)

    def _carry_out(self, req: Req, action: sampling.Action) -> None:
        if isinstance(action, sampling.Drained):
            return self._stop(req, Finish.STOPPED)
        if isinstance(action, sampling.Parked):
            self._parked.append(req.rid)
            return None
        for tok in action.tokens:
            assert tok == req.next_token(), "the transcript holds the written tokens"
            req.tokens.append(tok)
        if action.capped:
            self._stop(req, Finish.LENGTH)

    def _stop(self, req: Req, finish: Finish) -> None:
        req.status, req.finish = "finished", finish
        self._free(req)

    def _start_branch(self, launch: lifecycle.Launch) -> bool:
        fork = launch.fork
        parent = self.reqs[fork.parent]
        if not self.pool.share_prefix(parent.rid, launch.branch_id, parent.computed):
            return False
        # The Path's <Path> in the transcript: spans of the block, in order.
        block_t = parent.tindex(fork.parallel_uid)
        spans = [s for s in analyze(parent.transcript, TOKENS).spans if s.block == block_t]
        lead = len(TOKENS.path_header_lead)
        own = fork.prefix_len + (0 if launch.path == 0 else lead)
        child = Req(
            launch.branch_id,
            parent.tokens + list(launch.header),
            launch.max_tokens,
            fork.prefix_len + len(launch.header),
            parent.transcript,
            parent.stop_ids,
            offset=spans[launch.path].start - lead - fork.prefix_len,
            own_start=own,
            lead=range(fork.prefix_len, own),
            parent=parent,
            computed=parent.computed,
        )
        self.reqs[launch.branch_id] = child
        self.waiting.append(launch.branch_id)
        return True

    def _merge(self, fork) -> None:
        need = merge.blocks_needed(self.trees, fork)
        if need:
            victims = pressure.room_for(self.trees, need, fork, self.running, POLICY)
            if victims is None:
                return
            for root in victims:
                self.preempt_tree(root)
        parent = self.reqs[fork.parent]
        done = merge.merge(self.trees, fork)
        if done.aborted:
            self.finish(done.aborted, Finish.ABORTED)
        parent.tokens += done.cut.tokens
        if done.cut.end is not None:
            parent.stop_reason = done.cut.end.stop_reason
            return self._stop(parent, done.cut.end.finish)
        parent.computed = done.num_computed
        self._merged_into.update((b.block_id, parent.rid) for b in self.pool.tables[parent.rid])
        parent.status = "waiting"
        self.waiting.append(parent.rid)

    def _give_back_memory(self) -> None:
        decision = pressure.to_give_back(self.trees, self.running, POLICY)
        if isinstance(decision, str):
            self.preempt_tree(decision)
        elif decision is not None:
            self.finish(decision.branches, Finish.ABORTED)

    def preempt_tree(self, root: str) -> None:
        assert root in self.active_roots(), "only a running or parked tree is preempted"
        branches = pressure.preempt_tree(self.trees, root)
        self.finish(branches, Finish.ABORTED)
        req = self.reqs[root]
        if root in self.running:
            self.running.remove(root)
        self.pool.free_table(root)
        req.computed = 0
        self.trees.preempted(root)
        req.status = "held"

    # -- checks --------------------------------------------------------------

    def check(self) -> None:
        """Reference counts equal the tables and stashes holding each block,
        and every request's computed KV is its own tokens."""
        holders: dict[int, int] = {}
        for blocks in list(self.pool.tables.values()) + held_blocks(self.trees):
            for b in blocks:
                holders[b.block_id] = holders.get(b.block_id, 0) + 1
        for b in self.pool.blocks:
            held = holders.get(b.block_id, 0)
            assert b.ref == held, f"block {b.block_id}: ref {b.ref}, held {held}"
        assert len(self.pool.free) == sum(1 for b in self.pool.blocks if b.ref == 0)
        for rid, req in self.reqs.items():
            if req.computed == 0 or rid not in self.pool.tables or rid in self.trees.copies:
                continue  # nothing computed, or its merge copies not run yet
            got = [self.pool.kv.get(self.pool.slot(rid, i)) for i in range(req.computed)]
            want = [req.tindex(i) for i in range(req.computed)]
            assert got == want, f"KV of {rid!r} is not its own tokens"
        assert set(self.trees.tracks) == set(self.reqs)
        for rid, req in self.reqs.items():
            assert self.trees.tracks[rid].tokens.tolist() == req.tokens, f"the track of {rid!r} is not its tokens"
