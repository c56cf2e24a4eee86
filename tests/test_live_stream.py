"""Path 1 reaches the client as it is decoded: through vllm.LLM's engine,
stepped by hand with delta outputs, on held-out block prompts (nested
blocks included). Every token sent is final (the whole equals the
reference), Path 1's tokens come a step at a time from within two steps of
the fork, logprob rows come with their tokens, and unseeded sampled
requests stream live too (their Paths are seeded, so a Path decoded again
repeats what was sent)."""

import pytest
from engine_harness import final_tokens, greedy, held_out_prompts, reference_output, scheduler
from vllm.sampling_params import RequestOutputKind

from vllm_multiverse.structure import EventKind, analyze
from vllm_multiverse.tree import is_branch

SHARED_ENGINE = "tiny, defaults"


# Runs on V1 and on Model Runner V2 (pytest --model-runner v2).
pytestmark = pytest.mark.both_runners


@pytest.fixture(scope="module")
def llm(engines, tiny_model_dir):
    return engines.get(tiny_model_dir)


def _run(llm, rid, prompt, params, logprobs: list | None = None):
    """Step the engine until ``rid`` finishes: per step, the tokens it got
    and whether its fork was open after the step; ``logprobs`` collects
    the logprobs that came with them."""
    engine, sched = llm.llm_engine, scheduler(llm)
    engine.add_request(rid, {"prompt_token_ids": prompt}, params)
    steps, done = [], False
    for _ in range(5000):
        got = []
        for out in engine.step():
            if out.request_id == rid:
                got += out.outputs[0].token_ids
                if logprobs is not None:
                    logprobs += out.outputs[0].logprobs or []
                done = out.finished
        steps.append((got, any(k.startswith(rid) and not is_branch(k) for k in sched.trees.forks)))
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

    from vllm_multiverse.model_config import read_model_declaration

    return read_model_declaration(json.loads((TINY_MODEL / "config.json").read_text())).tokens


@pytest.mark.both_runners(v2="slow")  # minutes under Triton's interpreter
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


def _chunks_while_open(steps) -> int:
    """Steps after the one that forked that sent text while a fork was open."""
    first = next(j for j, (_, open_) in enumerate(steps) if open_)
    return sum(1 for got, open_ in steps[first + 1 :] if open_ and got)


def test_logprobs_stream_live_with_their_rows(llm):
    from engine_harness import reference

    prompt = _block_prompts()[0]
    want = reference().generate(list(prompt), max_tokens=1500)
    logprobs = []
    steps = _run(llm, "live-lp", prompt, greedy(logprobs=2, output_kind=RequestOutputKind.DELTA), logprobs)
    tokens = [t for got, _ in steps for t in got]
    assert _chunks_while_open(steps) > 40
    assert tokens == want.token_ids and len(logprobs) == len(tokens)
    for tok, got, written, ref_lp in zip(tokens, logprobs, want.written, want.logprobs):
        if written:
            assert list(got) == [tok] and got[tok].logprob == 0.0
        else:
            assert got[tok].rank == 1 and got[tok].logprob == pytest.approx(ref_lp, abs=1e-3)


@pytest.mark.both_runners(v2="slow")  # minutes under Triton's interpreter
def test_unseeded_sampling_streams_live_and_sends_the_engine_text(llm):
    """An unseeded sampled request's Paths are seeded from a seed drawn for
    it: its live text is what the engine's own request holds at the end."""
    with final_tokens(scheduler(llm)) as final:
        for i, prompt in enumerate(_block_prompts()[:2]):
            steps = _run(llm, f"hot-{i}", prompt, greedy(temperature=0.8, output_kind=RequestOutputKind.DELTA))
            assert _chunks_while_open(steps) > 20
            (rid,) = [r for r in final if r.startswith(f"hot-{i}")]
            assert [t for got, _ in steps for t in got] == final[rid]


def test_paths_seed_is_drawn_for_unseeded_sampling():
    from vllm import SamplingParams

    from vllm_multiverse.vllm032.scheduler import _paths_seed

    assert _paths_seed(SamplingParams(temperature=0.0)) is None
    assert _paths_seed(SamplingParams(temperature=0.8, seed=5)) == 5
    drawn = {_paths_seed(SamplingParams(temperature=0.8)) for _ in range(8)}
    assert len(drawn) == 8 and all(0 <= s < 2**63 for s in drawn)


@pytest.mark.both_runners(v2="slow")  # minutes under Triton's interpreter
def test_seeded_request_in_a_partial_prefill_beside_others(llm):
    """vLLM's CPU runner cannot move a CPU generator back after a partial
    prefill's discarded sample, and every sampled branch is seeded: a seeded
    request chunked beside another samples as it does alone."""
    from vllm import SamplingParams

    long = [t for p in held_out_prompts(40) for t in p][:1800]
    sched_cfg = llm.llm_engine.vllm_config.scheduler_config
    # The third prompt does not fit the first step's token budget.
    assert sched_cfg.enable_chunked_prefill and sched_cfg.max_num_batched_tokens < 3 * len(long)
    sp = SamplingParams(temperature=0.8, seed=11, max_tokens=24, skip_special_tokens=False)
    prompts = [long[::-1], long[1:], long]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    assert outs[2].num_cached_tokens < 1024  # computed in the batch, not read from the cache
    # Alone, it reads its KV from the prefix cache: the same draws follow.
    alone = llm.generate([{"prompt_token_ids": long}], sp, use_tqdm=False)[0].outputs[0].token_ids
    assert list(outs[2].outputs[0].token_ids) == list(alone)
