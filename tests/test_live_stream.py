"""Path 1 reaches the client as it is decoded: through vllm.LLM's engine,
stepped by hand with delta outputs, on held-out block prompts (nested
blocks included). Every token sent is final (the whole equals the
reference), Path 1's tokens come a step at a time from within two steps of
the fork, and a request whose Paths could decode differently when run
again (unseeded sampling) or that asks for logprobs gets each block whole
at its merge."""

import pytest
from vllm.sampling_params import RequestOutputKind

from conftest import in_process_llm
from engine_harness import greedy, held_out_prompts, reference_output, scheduler
from vllm_multiverse.structure import EventKind, analyze
from vllm_multiverse.tree import is_branch


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    with in_process_llm(tiny_model_dir) as llm:
        yield llm


def _run(llm, rid, prompt, params):
    """Step the engine until ``rid`` finishes: per step, the tokens it got
    and whether its fork was open after the step."""
    engine, sched = llm.llm_engine, scheduler(llm)
    engine.add_request(rid, {"prompt_token_ids": prompt}, params)
    steps, done = [], False
    for _ in range(5000):
        got = []
        for out in engine.step():
            if out.request_id == rid:
                got += out.outputs[0].token_ids
                done = out.finished
        steps.append((got, any(k.startswith(rid) and not is_branch(k) for k in sched.mv.forks)))
        if done:
            return steps
    raise AssertionError("did not finish")


def _block_prompts() -> list[list[int]]:
    """Two held-out prompts whose answers hold a block, and one whose answer
    nests a block inside Path 1."""
    flat, nested = [], []
    for p in held_out_prompts(40):
        ref, _ = reference_output(tuple(p), 1500)
        depths = [e.depth for e in analyze(list(p) + list(ref), _tokens()).events if e.kind is EventKind.FORK]
        if depths:
            (nested if max(depths) > 1 else flat).append(p)
        if len(flat) >= 2 and nested:
            break
    return flat[:2] + nested[:1]


def _tokens():
    import json

    from conftest import TINY_MODEL
    from vllm_multiverse.model_config import read_multiverse_config

    return read_multiverse_config(json.loads((TINY_MODEL / "config.json").read_text())).tokens


def test_path_1_streams_live_and_nothing_sent_changes(llm):
    prompts = _block_prompts()
    assert len(prompts) >= 3
    for i, prompt in enumerate(prompts):
        ref, _ = reference_output(tuple(prompt), 1500)
        steps = _run(llm, f"live-{i}", prompt, greedy(output_kind=RequestOutputKind.DELTA))
        sent = [t for got, _ in steps for t in got]
        assert sent == list(ref)  # every chunk is final text, in order
        fork_step = next(j for j, (_, open_) in enumerate(steps) if open_)
        # The reference's first Path: its tokens are the live text of the fork.
        s = analyze(list(prompt) + list(ref), _tokens())
        first = min((sp for sp in s.spans if sp.depth == 1), key=lambda sp: sp.start)
        path1 = (first.start - len(prompt), first.end - len(prompt))
        arrived, at = 0, []
        for j, (got, _) in enumerate(steps):
            n = sum(1 for _ in got)
            if n and arrived < path1[1] and arrived + n > path1[0]:
                at.append(j)
            arrived += n
        # A nested block's Paths after its first one arrive at the nested
        # merge, in one chunk; every other token of Path 1 in its own step.
        later = [sp for sp in s.spans if sp.depth == 2 and first.start <= sp.start < first.end]
        firsts = {min((x for x in later if x.block == sp.block), key=lambda x: x.start) for sp in later}
        merged_whole = sum(sp.end - sp.start for sp in later if sp not in firsts)
        # Path 1's header goes out at the fork, its first sampled token
        # within two steps of it, then one chunk per sampled token (the
        # headers the engine writes, a few tokens each, come as one).
        assert at[0] <= fork_step + 2, (at[:3], fork_step)
        assert len(at) >= (path1[1] - path1[0]) - merged_whole - 16, (len(at), path1, merged_whole)
        assert len(at) > 40
        # Path 1's text was all sent while the fork was still open.
        open_steps = [j for j, (_, open_) in enumerate(steps) if open_]
        assert at[-1] <= max(open_steps) + 1


@pytest.mark.parametrize("kind", ["unseeded", "logprobs"])
def test_blocks_arrive_whole_where_live_text_could_change(llm, kind):
    prompt = _block_prompts()[0]
    if kind == "unseeded":
        params = greedy(temperature=0.8, output_kind=RequestOutputKind.DELTA)
    else:
        params = greedy(logprobs=2, output_kind=RequestOutputKind.DELTA)
    steps = _run(llm, f"whole-{kind}", prompt, params)
    during = [got for got, open_ in steps[1:] if open_]
    # While the fork is open nothing goes out but the step that forked.
    assert all(not got for got in during[1:]), [len(g) for g in during]
    if kind == "logprobs":
        ref, _ = reference_output(tuple(prompt), 1500)
        assert [t for got, _ in steps for t in got] == list(ref)
