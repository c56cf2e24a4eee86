"""The tree logic on its own (no vLLM): the text order and its stops, the
caps per client request, victim choice, and the interleavings that once
corrupted KV or leaked, each driven through the fake engine."""

from __future__ import annotations

import pytest
from fake_engine import FakeEngine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_structure_properties import malformed
from toy_vocab import TOKENS, VOCAB, ids
from tree_checks import held_blocks, leftovers

from vllm_multiverse.config import MultiverseConfig
from vllm_multiverse.structure import StructureConfig, StructureState, analyze
from vllm_multiverse.tree import (
    BranchResult,
    Cut,
    End,
    Finish,
    Fork,
    Limits,
    StopRule,
    Track,
    Trees,
    is_branch,
    lifecycle,
    merge,
    pressure,
    text_in_order,
)

NL = VOCAB["\n"]
BLOCK = ids(
    "x <Parallel> NL <Goal> NL <Outline> NL 1 : </Outline> NL <Outline> NL 2 : </Outline> NL </Goal> "
    "NL <Path> NL 1 : a a b </Path> NL <Path> NL 2 : c c c c </Path> NL <Conclusion> NL b </Conclusion> NL "
    "</Parallel> y y"
)


def _fork(paths: list[list[int]], ends=None, budget=100, stops=()) -> Fork:
    """A fork whose Paths ended with these texts (headers included)."""
    headers = tuple(tuple(p[:4]) for p in paths)
    fork = Fork(
        "p", 0, "p", "p", headers, prefix_len=10, lead_len=1, rule=StopRule(budget, frozenset(stops)), concurrency=2
    )
    for k, p in enumerate(paths):
        n = 5 if k == 0 else 4  # "\n<Path>\n1:" and "<Path>\n2:"
        written = bytes([1] * n + [0] * (len(p) - n))
        end = (ends or {}).get(k)
        fork.results[k] = BranchResult(f"b{k}", p, written, [], end, None)
    return fork


def _text(fork: Fork, rule: StopRule, header) -> Cut | None:
    return text_in_order(fork.results, fork.num_paths, rule, header)


P1 = ids("NL <Path> NL 1 : a a </Path> NL")
P2 = ids("<Path> NL 2 : b d b </Path> NL")


def test_text_in_order_is_the_sequential_text():
    cut = _text(_fork([P1, P2]), StopRule(100, frozenset()), TOKENS.conclusion_header)
    assert cut.tokens == P1 + P2 + list(TOKENS.conclusion_header) and cut.end is None
    assert cut.written == bytes([1] * 5 + [0] * 4 + [1] * 4 + [0] * 5 + [1, 1])


def test_a_stop_token_in_a_later_path_ends_the_text_there():
    d = VOCAB["d"]
    cut = _text(_fork([P1, P2]), StopRule(100, frozenset({d})), TOKENS.conclusion_header)
    assert cut.tokens == P1 + P2[: P2.index(d) + 1]
    assert cut.end == End(Finish.STOPPED, d)


def test_written_tokens_never_stop_the_text():
    # <Path> is a stop token here, but the engine wrote every <Path>.
    cut = _text(_fork([P1, P2]), StopRule(100, frozenset({VOCAB["<Path>"]})), TOKENS.conclusion_header)
    assert cut.end is None


@pytest.mark.parametrize("budget", [3, len(P1), len(P1) + 2, len(P1) + len(P2) + 1])
def test_the_budget_cuts_in_text_order(budget):
    # The budget is what max_tokens and max_model_len leave, whichever is less.
    cut = _text(_fork([P1, P2]), StopRule(budget, frozenset()), TOKENS.conclusion_header)
    assert cut.tokens == (P1 + P2 + list(TOKENS.conclusion_header))[:budget]
    assert cut.end == End(Finish.LENGTH)


@pytest.mark.parametrize("finish", [Finish.ERROR, Finish.REPETITION, Finish.LENGTH, Finish.STOPPED])
def test_a_path_that_ends_early_ends_the_text_there(finish):
    # Path 1 stopped before its tail for some other reason: Path 2 is past the end.
    short = P1[:6]
    cut = _text(_fork([short, P2], ends={0: End(finish)}), StopRule(100, frozenset()), TOKENS.conclusion_header)
    assert cut.tokens == short and cut.end == End(finish)


def test_the_text_waits_for_a_path_that_could_still_be_in_it():
    fork = _fork([P1, P2])
    del fork.results[1]
    assert _text(fork, StopRule(100, frozenset()), TOKENS.conclusion_header) is None
    # ... unless the text already ended before it.
    fork.results[0].end = End(Finish.LENGTH)
    assert _text(fork, StopRule(100, frozenset()), TOKENS.conclusion_header).end == End(Finish.LENGTH)


def test_caps_hold_per_client_request():
    """n > 1 siblings share one client request: their forks together run
    at most max_branches_per_request branches beside their siblings."""
    cfg = MultiverseConfig(max_branches_per_request=3)
    trees = Trees(TOKENS, StructureConfig(), cfg, None, max_model_len=1000)
    goal = BLOCK[: BLOCK.index(VOCAB["</Goal>"]) + 1]
    a = trees.add("0_r", goal, Limits(100), sequential=False, client="r")
    b = trees.add("1_r", goal, Limits(100), sequential=False, client="r")
    c = trees.add("s", goal, Limits(100), sequential=False, client="s")
    assert a.engine_due and b.engine_due and c.engine_due
    assert lifecycle.open_fork(trees, "0_r").concurrency == 2
    assert lifecycle.open_fork(trees, "1_r").concurrency == 1  # 2 + 2 > 3: one at a time
    assert lifecycle.open_fork(trees, "s").concurrency == 2  # another client
    assert trees.stats["fallbacks"] == 1


def test_victims_are_the_lowest_priority_then_the_newest():
    cands = [
        pressure.Candidate("old", 0, 1.0, 0),
        pressure.Candidate("new", 0, 2.0, 1),
        pressure.Candidate("low", 5, 0.5, 2),
    ]
    assert pressure.victim(cands, "fcfs").root == "new"
    assert pressure.victim(cands, "priority").root == "low"
    size = {"old": 4, "new": 1, "low": 2}.get
    assert [c.root for c in pressure.victims_for(3, cands, size, "fcfs")] == ["new", "old"]
    assert pressure.victims_for(8, cands, size, "fcfs") is None  # not enough: preempt nothing


def _until(engine, cond, limit=500):
    for _ in range(limit):
        if cond():
            return
        engine.step()
        engine.check()
    raise AssertionError("condition not reached")


NESTED = ids(
    "x <Parallel> NL <Goal> NL <Outline> NL 1 : </Outline> NL <Outline> NL 2 : </Outline> NL </Goal> "
    "NL <Path> NL 1 : a NL <Parallel> NL <Goal> NL <Outline> NL 1 . 1 : </Outline> NL <Outline> NL 1 . 2 : "
    "</Outline> NL </Goal> NL <Path> NL 1 . 1 : a b </Path> NL <Path> NL 1 . 2 : c c </Path> NL <Conclusion> "
    "NL b </Conclusion> NL </Parallel> NL a </Path> NL <Path> NL 2 : c c c c </Path> NL <Conclusion> NL b "
    "</Conclusion> NL </Parallel> y y"
)


def _two_requests(t=BLOCK, pool_blocks=80):
    engine = FakeEngine(pool_blocks, 2)
    engine.add("a", t, 1, len(t) - 1)
    engine.add("b", t, 1, len(t) - 1)
    return engine, t


@pytest.mark.parametrize("how", ["abort", "preempt", "abort_all"])
def test_a_request_gone_between_its_merge_and_its_copies_corrupts_nothing(how):
    """The merge's destination blocks stay the tree's until the step that
    runs the copies: another request allocating in that step (LIFO reuse)
    must not receive them."""
    engine, t = _two_requests(NESTED)
    if how == "preempt":
        # A nested merge: the merged request is a branch, gone with its tree.
        _until(engine, lambda: any(is_branch(r) and r in engine.trees.copies for r in engine.reqs))
        engine.preempt_tree(engine.trees.tracks[next(r for r in engine.reqs if r in engine.trees.copies)].root)
    else:
        _until(engine, lambda: "a" in engine.trees.copies)
        engine.abort_all() if how == "abort_all" else engine.abort(["a"])
    engine.add("c", t, 1, len(t) - 1)  # allocates in the next step
    _until(engine, lambda: not engine.has_work())
    assert not leftovers(engine.trees) and len(engine.pool.free) == len(engine.pool.blocks)
    assert engine.results["c"].tokens == t
    if how == "preempt":
        assert engine.results["a"].tokens == t


def test_a_branch_aborted_alone_runs_its_path_again():
    engine, t = _two_requests()
    _until(engine, lambda: any(is_branch(r) for r in engine.reqs))
    branch = next(r for r in engine.reqs if is_branch(r))
    engine.abort([branch])
    _until(engine, lambda: not engine.has_work())
    assert engine.results["a"].tokens == t and engine.results["b"].tokens == t


def test_clear_releases_every_fork_stash_and_copy():
    engine, t = _two_requests()
    _until(engine, lambda: engine.trees.forks and any(f.results for f in engine.trees.forks.values()))
    assert held_blocks(engine.trees)
    engine.abort_all()
    assert not engine.reqs and not leftovers(engine.trees) and not held_blocks(engine.trees)
    assert len(engine.pool.free) == len(engine.pool.blocks)


def test_a_merge_that_preempts_another_tree_skips_that_fork():
    """Making room for one merge may preempt another tree whose fork was
    ready in the same step: that fork is gone, not merged."""
    engine, _ = _two_requests()
    _until(engine, lambda: {"a", "b"} <= set(engine.trees.forks))
    for fork in engine.trees.forks.values():
        fork.cut = Cut([], b"", None, End(Finish.LENGTH))  # both ready in one step
    merged = []
    for fork in merge.ready(engine.trees):
        merged.append(fork.parent)
        engine.preempt_tree(({"a", "b"} - {fork.parent}).pop())
    assert len(merged) == 1


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(malformed(), st.data())
def test_a_track_extended_in_bulk_is_the_track_appended_token_by_token(seq, data):
    """Plain text outside blocks goes into a track in bulk (a prompt); the
    result is the token-by-token one, and positions_for's shortcut for a
    range of constant shift answers what the batch rule's positions say."""
    k = data.draw(st.integers(0, len(seq)))
    written = data.draw(st.lists(st.booleans(), min_size=len(seq), max_size=len(seq)))
    bulk, one = (Track(StructureState(TOKENS), root="r", client="r", limits=Limits(100)) for _ in range(2))
    bulk.extend(seq[:k])
    bulk.extend(seq[k:], bytes(written[k:]))
    for i, tok in enumerate(seq):
        one.append(tok, written=i >= k and written[i])
    assert bulk.tokens == one.tokens and bulk.positions == one.positions
    assert bulk.hidden == one.hidden and bulk.written == one.written
    for attr in ("position", "chain", "event", "block", "part"):
        assert getattr(bulk.state, attr) == getattr(one.state, attr), attr
    if not seq:
        return
    pos = analyze(seq, TOKENS).positions.tolist()
    start = data.draw(st.integers(0, len(seq) - 1))
    end = data.draw(st.integers(start + 1, len(seq)))
    shifts = {i - pos[i] for i in range(start, end)}
    want = (shifts.pop() or None) if len(shifts) == 1 else pos[start:end]
    for track in (bulk, one, one.branch(_fork([]), 0, (), 100)):
        assert track.positions_for(start, end) == want
