"""The tree logic under random interleavings, against a fake block pool.

Hypothesis drives :class:`MultiverseState` inside a small model of vLLM's
scheduler (``fake_engine.py``) through random sequences of new requests,
steps (forks, launches, branch ends, merges, vLLM's own preemptions under a
small KV cache), aborts of a parent, of a branch and of everything, tree
preemptions, pauses and resumes. After every step: each block's reference
count equals the tables and stashes holding it, and every request's KV holds
its own tokens (a copy into a block someone else owns would show). At the
end, every request that was not aborted has exactly the sequential text,
and nothing is left.
"""

from __future__ import annotations

from fake_engine import FakeEngine
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from toy_vocab import VOCAB
from tree_checks import leftovers

from vllm_multiverse.config import MultiverseConfig
from vllm_multiverse.tree import Finish, is_branch

NL = VOCAB["\n"]
STOP = VOCAB["d"]
WORDS = [VOCAB[w] for w in ("a", "b", "c", "x", "y", "z")]


@st.composite
def words(draw, lo=0, hi=4):
    return draw(st.lists(st.sampled_from(WORDS), min_size=lo, max_size=hi))


@st.composite
def block(draw, depth: int, prefix: list[int]):
    """A Parallel block in the authors' serialisation, as sequential
    decoding writes it (the engine-written headers included)."""
    n = draw(st.integers(1, 3))
    labels = [prefix + [VOCAB[str(k + 1)]] for k in range(n)]
    out = [VOCAB["<Parallel>"], NL, VOCAB["<Goal>"], NL]
    for lbl in labels:
        out += [VOCAB["<Outline>"], NL, *lbl, VOCAB[":"], *draw(words(0, 2)), VOCAB["</Outline>"], NL]
    out.append(VOCAB["</Goal>"])
    for k, lbl in enumerate(labels):
        out += ([NL] if k == 0 else []) + [VOCAB["<Path>"], NL, *lbl, VOCAB[":"]]
        out += draw(words(0, 4))
        if depth < 2 and draw(st.integers(0, 3)) == 0:
            out += [NL, *draw(block(depth + 1, lbl + [VOCAB["."]])), NL]
        out += draw(words(0, 3)) + [VOCAB["</Path>"], NL]
    out += [VOCAB["<Conclusion>"], NL, *draw(words(0, 3)), VOCAB["</Conclusion>"], NL, VOCAB["</Parallel>"]]
    return out


@st.composite
def transcripts(draw):
    out = draw(words(2, 3))
    for _ in range(draw(st.integers(1, 2))):
        out += draw(block(1, [])) + [NL] + draw(words(0, 3))
    if draw(st.booleans()):
        out.append(STOP)
    return out + draw(words(0, 2))


def expected(transcript: list[int], prompt_len: int, max_tokens: int, stop: bool) -> list[int]:
    """The sequential text: the transcript from the prompt on, to the first
    stop token (headers never hold one) or max_tokens."""
    out = []
    for tok in transcript[prompt_len:]:
        out.append(tok)
        if (stop and tok == STOP) or len(out) == max_tokens:
            break
    return out


class TreeMachine(RuleBasedStateMachine):
    @initialize(
        first=transcripts(),
        slack=st.integers(0, 60),
        block_size=st.sampled_from([2, 3, 4, 8]),
        max_paths=st.sampled_from([2, 16]),
        max_branches=st.sampled_from([3, 64]),
    )
    def setup(self, first, slack, block_size, max_paths, max_branches):
        # A pool sized for the first request alone, give or take: later
        # ones compete for it (preemptions, held trees, rollbacks).
        cfg = MultiverseConfig(max_paths_per_fork=max_paths, max_branches_per_request=max_branches)
        self.engine = FakeEngine(self._needs(first, block_size) + slack, block_size, cfg)
        self.wanted: dict[str, list[int] | None] = {}  # None: aborted
        self.n = 0

    @staticmethod
    def _needs(t: list[int], block_size: int) -> int:
        """Blocks one request needs alone: its text, and its Paths' stashes
        beside it until the merge."""
        return -(-len(t) // block_size) * 2 + 8

    def _live_roots(self):
        return sorted(r for r in self.engine.reqs if not is_branch(r))

    @precondition(lambda self: len(self._live_roots()) < 6)
    @rule(data=st.data())
    def add(self, data):
        t = data.draw(transcripts())
        # The whole text must fit the pool with room for its Paths' stashes.
        if self._needs(t, self.engine.pool.block_size) > len(self.engine.pool.blocks):
            return
        # Mostly before the first block, so that the engine forks; else
        # anywhere (a prompt that holds a block, or ends at a </Goal>).
        first = t.index(VOCAB["<Parallel>"]) if VOCAB["<Parallel>"] in t else len(t) - 1
        p = data.draw(st.integers(1, max(1, min(first, len(t) - 1))) | st.integers(1, len(t) - 1))
        max_tokens = data.draw(st.just(len(t) - p) | st.integers(1, len(t) - p))
        stop = STOP in t[p:] and data.draw(st.booleans())
        rid = f"r{self.n}"
        self.n += 1
        self.engine.add(rid, t, p, max_tokens, {STOP} if stop else ())
        self.wanted[rid] = expected(t, p, max_tokens, stop)

    @rule(steps=st.integers(1, 30))
    def step(self, steps):
        for _ in range(steps):
            self.engine.step()
            self.engine.check()
            if self._just_merged():
                break  # give the other rules a turn right after a merge

    @precondition(lambda self: self._live_roots())
    @rule(data=st.data())
    def abort_root(self, data):
        rid = data.draw(st.sampled_from(self._live_roots()))
        self.engine.abort([rid])
        self.wanted[rid] = None

    def _just_merged(self):
        return sorted(r for r in self.engine.reqs if r in self.engine.trees.copies)

    @precondition(lambda self: self._just_merged())
    @rule(data=st.data(), preempt=st.booleans())
    def abort_or_preempt_just_merged(self, data, preempt):
        # Between a merge and the step that runs its copies: the copies'
        # blocks must not go to another request in that step.
        root = self.engine.trees.tracks[data.draw(st.sampled_from(self._just_merged()))].root
        if preempt and root in self.engine.active_roots():
            self.engine.preempt_tree(root)
        else:
            self.engine.abort([root])
            self.wanted[root] = None

    @precondition(lambda self: any(is_branch(r) for r in self.engine.reqs))
    @rule(data=st.data())
    def abort_branch(self, data):
        # vLLM aborting one branch alone: its Path runs again.
        rid = data.draw(st.sampled_from(sorted(r for r in self.engine.reqs if is_branch(r))))
        self.engine.abort([rid])

    @rule()
    def abort_all(self):
        for rid in self._live_roots():
            self.wanted[rid] = None
        self.engine.abort_all()

    @precondition(lambda self: self.engine.active_roots())
    @rule(data=st.data())
    def preempt_tree(self, data):
        self.engine.preempt_tree(data.draw(st.sampled_from(self.engine.active_roots())))

    @rule()
    def pause(self):
        self.engine.paused = True

    @rule()
    def resume(self):
        self.engine.paused = False

    @invariant()
    def consistent(self):
        self.engine.check()

    def teardown(self):
        engine = self.engine
        engine.paused = False
        for _ in range(20_000):
            if not engine.has_work():
                break
            engine.step()
            engine.check()
        assert not engine.has_work(), "requests never finished"
        assert not engine.reqs and not leftovers(engine.trees)
        assert all(b.ref == 0 for b in engine.pool.blocks) and len(engine.pool.free) == len(engine.pool.blocks)
        for rid, want in self.wanted.items():
            got = engine.results[rid]
            if want is None:
                continue
            assert got.finish is not Finish.ABORTED
            assert got.tokens[got.num_prompt :] == want, rid


TreeMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=60, deadline=None, suppress_health_check=list(HealthCheck)
)
test_tree_state_machine = TreeMachine.TestCase
