"""The engine with a KV cache too small for its batch, and prefix caching off:
preemption happens, merged requests recompute in one masked pass, outputs
stay exact; sequential decoding too."""

import pytest
from engine_harness import final_tokens, greedy, held_out_prompts, reference_output, scheduler, step_until, tokenizer
from tree_checks import leftovers

from tiny_model.train import chat_prompt

# 23 blocks of 128 tokens: one 2,048-token request fits, a batch of forks does not.
KV_BYTES = 12 * 2**20


# Runs on V1 and on Model Runner V2 (pytest --model-runner v2).
pytestmark = pytest.mark.both_runners


@pytest.fixture(scope="module")
def llm(engines, tiny_model_dir):
    return engines.get(tiny_model_dir, kv_cache_memory_bytes=KV_BYTES, enable_prefix_caching=False)


def _idle(llm) -> bool:
    sched = scheduler(llm)
    pool = sched.kv_cache_manager.block_pool
    return (
        not leftovers(sched.trees)
        and not sched.requests
        and pool.get_num_free_blocks() == pool.num_gpu_blocks - 1  # vLLM's null block
    )


def test_prefix_caching_off_means_no_cache_reads(llm):
    sched = scheduler(llm)
    assert not sched.mv_config.prefix_caching
    prompt = held_out_prompts(4)[0]
    first, second = (llm.generate([{"prompt_token_ids": prompt}], greedy(), use_tqdm=False)[0] for _ in range(2))
    assert second.num_cached_tokens == 0
    assert list(first.outputs[0].token_ids) == list(second.outputs[0].token_ids)
    assert list(first.outputs[0].token_ids) == reference_output(tuple(prompt), 1500)[0]


@pytest.mark.both_runners(v2="slow")  # minutes under Triton's interpreter
def test_batch_under_kv_pressure_preempts_and_stays_exact(llm):
    """Greedy requests equal the reference. Sampled ones (unseeded, with
    logprobs) get exactly the engine's own text, though trees whose live
    text was already sent are preempted and their Paths decoded again."""
    sched = scheduler(llm)
    stats0 = dict(sched.trees.stats)
    prompts = held_out_prompts(16)
    sampled = set(range(1, len(prompts), 3))
    params = [greedy(temperature=2.0, logprobs=1) if i in sampled else greedy() for i in range(len(prompts))]
    preempted_live = []
    preempt = sched._preempt_tree

    def record(root):
        if sched.trees.live_sent.get(root):
            preempted_live.append(root.rsplit("-", 1)[0])
        return preempt(root)

    sched._preempt_tree = record
    try:
        with final_tokens(sched) as final:
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    finally:
        del sched._preempt_tree
    assert sched.trees.stats["preemptions"] > stats0["preemptions"]
    assert sched.trees.stats["merges"] > stats0["merges"]
    engine_text = {rid.rsplit("-", 1)[0]: tokens for rid, tokens in final.items()}
    for i, (p, o) in enumerate(zip(prompts, outs)):
        out = o.outputs[0]
        if i in sampled:
            assert list(out.token_ids) == engine_text[o.request_id]
            assert len(out.logprobs) == len(out.token_ids)
            assert all(t in lp for t, lp in zip(out.token_ids, out.logprobs))
        else:
            assert list(out.token_ids) == reference_output(tuple(p), 1500)[0]
    assert {outs[i].request_id for i in sampled} & set(preempted_live), preempted_live
    assert _idle(llm)


def test_preempted_merged_request_recomputes_in_one_masked_pass(llm):
    """Preempt a request right after a merge: vLLM recomputes it from its
    tokens, and the Paths in them must not see each other (a causal
    recompute gives other tokens after the merge)."""
    from tiny_model.train import held_out_tasks

    sched = scheduler(llm)
    task = next(t for t in held_out_tasks(200) if len(t.rounds) == 2)
    prompt = tokenizer().encode(chat_prompt(tokenizer(), task.prompt()), add_special_tokens=False)
    llm.llm_engine.add_request("recompute", {"prompt_token_ids": prompt}, greedy())

    def merged_and_running():
        return sched.trees.stats["merges"] > merges0 and any(
            r.request_id.startswith("recompute") for r in sched.running
        )

    merges0 = sched.trees.stats["merges"]
    outs = step_until(llm, merged_and_running)
    (req,) = [r for r in sched.running if r.request_id.startswith("recompute")]
    masked0 = sched.trees.stats["masked_tokens"]
    sched._preempt_tree(req.request_id)
    assert req.num_computed_tokens == 0
    outs += step_until(llm, lambda: not llm.llm_engine.has_unfinished_requests())
    assert sched.trees.stats["masked_tokens"] > masked0
    final = [o for o in outs if o.request_id.startswith("recompute") and o.finished]
    assert final and list(final[-1].outputs[0].token_ids) == reference_output(tuple(prompt), 1500)[0]
    assert _idle(llm)


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 8, 64])
def test_acceptance_200_prompts_prefix_caching_off_under_pressure(llm, batch):
    sched = scheduler(llm)
    preemptions0 = sched.trees.stats["preemptions"]
    prompts = held_out_prompts(200)
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        outs = llm.generate([{"prompt_token_ids": p} for p in chunk], greedy(), use_tqdm=False)
        for p, o in zip(chunk, outs):
            assert list(o.outputs[0].token_ids) == reference_output(tuple(p), 1500)[0]
    if batch > 1:  # one request alone fits in this cache
        assert sched.trees.stats["preemptions"] > preemptions0
    assert _idle(llm)


@pytest.mark.both_runners(v2="slow")  # minutes under Triton's interpreter
def test_sequential_with_prefix_caching_off(llm):
    prompts = held_out_prompts(16)[:4]
    params = greedy(extra_args={"multiverse_sequential": True})
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert list(o.outputs[0].token_ids) == reference_output(tuple(p), 1500)[0]
        assert o.num_cached_tokens == 0


@pytest.mark.both_runners(v2="slow")  # minutes under Triton's interpreter
def test_pause_wait_drains_in_flight_trees_and_resume_finishes_the_held_ones(llm):
    """vLLM's pause_scheduler("wait") steps until nothing is in flight
    (PAUSED_NEW admits only requests holding KV). Trees preempted for memory
    and held are queued work, like vLLM's own preempted requests: the pause
    completes without them, and they finish after the resume."""
    from vllm.v1.core.sched.interface import PauseState

    sched = scheduler(llm)
    engine = llm.llm_engine
    prompts = held_out_prompts(24)
    for i, p in enumerate(prompts):
        engine.add_request(f"wait-{i}", {"prompt_token_ids": p}, greedy())
    outs = step_until(llm, lambda: sched.trees.held and sched.trees.forks)
    sched.set_pause_state(PauseState.PAUSED_NEW)
    try:
        # What EngineCoreProc's "wait" pause waits for: no work left to step.
        outs += step_until(llm, lambda: not sched.has_requests(), limit=20_000)
        assert sched.trees.held or sched.waiting  # queued work stays queued
        assert not sched.trees.forks and not sched.running
    finally:
        sched.set_pause_state(PauseState.UNPAUSED)
    outs += step_until(llm, lambda: not engine.has_unfinished_requests(), limit=20_000)
    done = {o.request_id: o for o in outs if o.finished}
    for i, p in enumerate(prompts):
        assert list(done[f"wait-{i}"].outputs[0].token_ids) == reference_output(tuple(p), 1500)[0]
    assert _idle(llm)
