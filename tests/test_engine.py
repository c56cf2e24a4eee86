"""The fork/merge engine through vllm.LLM on the tiny model: token-identical
to the sequential reference, sharing prefix blocks, merging without recompute."""

import pytest
from conftest import model_runner
from engine_harness import MAX_TOKENS, greedy, held_out_prompts, reference_output, scheduler, step_until
from tree_checks import leftovers

SHARED_ENGINE = "tiny, defaults"
# Stock vLLM fails there too: Model Runner V2 samples top-k and top-p with a
# Triton kernel that Triton's interpreter cannot run ("'int' object has no
# attribute 'to'"), so on this CPU's V2 the argmax of n > 1 is not reachable.
V2_TOP_K = "top-k sampling: V2's Triton top-k kernel does not run under Triton's interpreter"


# Runs on V1 and on Model Runner V2 (pytest --model-runner v2).
pytestmark = pytest.mark.both_runners


@pytest.fixture(scope="module")
def llm(engines, tiny_model_dir):
    return engines.get(tiny_model_dir)


def test_engine_is_multiverse_on_the_sessions_runner(llm):
    from vllm_multiverse.vllm032.cpu.worker import MultiverseCPUModelRunner, MultiverseCPUModelRunnerV2
    from vllm_multiverse.vllm032.runner_v2 import MultiverseModelState
    from vllm_multiverse.vllm032.scheduler import MultiverseScheduler

    assert isinstance(scheduler(llm), MultiverseScheduler)
    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    if model_runner() == "v2":
        assert type(runner) is MultiverseCPUModelRunnerV2 and isinstance(runner.model_state, MultiverseModelState)
    else:
        assert type(runner) is MultiverseCPUModelRunner


@pytest.mark.parametrize("batch", [1, pytest.param(8, marks=pytest.mark.both_runners(v2="slow"))])
def test_greedy_outputs_equal_the_reference(llm, batch):
    prompts = held_out_prompts(16)[: max(batch, 4)]
    sched = scheduler(llm)
    forks0 = sched.trees.stats["forks"]
    got = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        outs = llm.generate([{"prompt_token_ids": p} for p in chunk], greedy(), use_tqdm=False)
        got += [list(o.outputs[0].token_ids) for o in outs]
    for p, g in zip(prompts, got):
        ref, _ = reference_output(tuple(p), MAX_TOKENS)
        assert g == ref
    assert sched.trees.stats["forks"] > forks0


def _group_of(sched, name):
    """The open fork of the request the test added as ``name`` (vLLM may
    extend request ids internally)."""
    for rid, group in sched.trees.forks.items():
        if rid.startswith(name):
            return group
    return None


def _free_blocks(llm):
    return scheduler(llm).kv_cache_manager.block_pool.get_num_free_blocks()


def assert_idle(llm, free0):
    """Nothing left anywhere: vLLM's requests, every structure the plugin
    keeps per request, and the KV blocks."""
    sched = scheduler(llm)
    assert not sched.requests and not sched.running and not sched.waiting and not sched.kv_holding_waiting
    assert leftovers(sched.trees) == {}
    assert not sched._parked and not sched._written
    assert _free_blocks(llm) == free0


def test_fork_shares_prefix_blocks_and_siblings_decode_together(llm):
    sched = scheduler(llm)
    prompt = held_out_prompts(16)[0]
    llm.llm_engine.add_request("share", {"prompt_token_ids": prompt}, greedy())
    step_until(llm, lambda: _group_of(sched, "share") is not None and _group_of(sched, "share").running)
    group = _group_of(sched, "share")
    mgr = sched.kv_cache_manager
    parent_blocks = mgr.get_blocks(group.parent).blocks[0]
    full = group.prefix_len - 1  # tokens with KV in the parent at the fork
    n_full = full // sched.block_size
    assert len(group.running) == len(group.headers) >= 2
    for child_id in group.running.values():
        child = sched.requests[child_id]
        child_blocks = mgr.get_blocks(child_id).blocks[0]
        ids = [b.block_id for b in child_blocks[:n_full]]
        assert ids == [b.block_id for b in parent_blocks[:n_full]]
        assert child.num_computed_tokens == full
    for b in parent_blocks[:n_full]:
        assert b.ref_cnt == 1 + len(group.running)
    # Siblings run in the same steps: each step until the first one ends
    # schedules every branch.
    branch_ids = set(group.running.values())
    steps = []
    original = sched.schedule

    def recording_schedule(*args, **kwargs):
        out = original(*args, **kwargs)
        steps.append(set(out.num_scheduled_tokens))
        return out

    sched.schedule = recording_schedule
    try:
        # Until the first branch ends, or the block merges: Paths of equal
        # length all end in one step, and the merge then closes the fork.
        while not group.results and _group_of(sched, "share") is group:
            llm.llm_engine.step()
    finally:
        del sched.schedule
    assert len(steps) > 5
    assert all(branch_ids <= s for s in steps[:-1])
    step_until(llm, lambda: not llm.llm_engine.has_unfinished_requests())


@pytest.mark.both_runners(v2="slow")  # minutes under Triton's interpreter
def test_abort_parent_aborts_branches_and_frees_blocks(llm):
    sched = scheduler(llm)
    free0 = _free_blocks(llm)
    prompt = held_out_prompts(16)[1]
    llm.llm_engine.add_request("abort-me", {"prompt_token_ids": prompt}, greedy())
    step_until(llm, lambda: _group_of(sched, "abort-me") is not None and len(_group_of(sched, "abort-me").running) >= 2)
    parent_id = _group_of(sched, "abort-me").parent
    branch_ids = list(_group_of(sched, "abort-me").running.values())
    for _ in range(3):
        llm.llm_engine.step()
    llm.llm_engine.abort_request(["abort-me"])
    for _ in range(3):
        llm.llm_engine.step()
    assert not llm.llm_engine.has_unfinished_requests()
    assert parent_id not in sched.requests and not any(b in sched.requests for b in branch_ids)
    assert_idle(llm, free0)


def _structured_prompt(goal_body: str) -> list[int]:
    from engine_harness import tokenizer

    tok = tokenizer()
    head = held_out_prompts(16)[2]
    return head + tok.encode(
        "<Think>\nLet's think in parallel.\n<Parallel>\n<Goal>\n" + goal_body + "</Goal>", add_special_tokens=False
    )


@pytest.mark.both_runners(v2="slow")  # minutes under Triton's interpreter
@pytest.mark.parametrize("n_outlines", [0, 20, 100])
def test_goal_with_zero_or_many_outlines(llm, n_outlines):
    """Zero Outlines, or more than the structure rule's 64: a causal block,
    no fork. 20: more than the 16 Paths a fork may run at once, so they run
    one at a time; max_tokens cuts the text in order and the Paths past the
    cut never start."""
    sched = scheduler(llm)
    free0 = _free_blocks(llm)
    fallbacks0 = sched.trees.stats["fallbacks"]
    prompt = _structured_prompt("".join(f"<Outline>\n{k + 1}:\n</Outline>\n" for k in range(n_outlines)))
    out = llm.generate([{"prompt_token_ids": prompt}], greedy(max_tokens=300), use_tqdm=False)[0].outputs[0]
    ref, reason = reference_output(tuple(prompt), 300)
    assert list(out.token_ids) == ref and out.finish_reason == reason
    assert sched.trees.stats["fallbacks"] == fallbacks0 + (n_outlines == 20)
    assert _free_blocks(llm) == free0 and not sched.trees.forks


def test_max_tokens_inside_a_nested_block(llm):
    """The cap falls in a nested Path: Path 1 ends at its own (nested)
    merge, and the outer fork must still take its text and merge. It once
    waited on that Path forever."""
    from engine_harness import tokenizer

    from tiny_model.train import held_out_tasks
    from vllm_multiverse.structure import MultiverseTokens

    tok = tokenizer()
    goal_close = MultiverseTokens.from_tokenizer(tok).goal_close
    sched = scheduler(llm)
    free0 = _free_blocks(llm)
    split = [p for t, p in zip(held_out_tasks(200), held_out_prompts(200)) if t.split is not None][:3]
    assert split
    for prompt in split:
        full, _ = reference_output(tuple(prompt), MAX_TOKENS)
        closes = [i for i, t in enumerate(full) if t == goal_close]
        assert len(closes) >= 2, "the model did not nest on a split prompt"
        cap = closes[1] + 12  # inside nested Path 1.1, in text order
        rid = f"nested-cap-{cap}"
        llm.llm_engine.add_request(rid, {"prompt_token_ids": prompt}, greedy(max_tokens=cap))
        # Stepped with a limit: the bug this pins down never finished.
        outs = step_until(llm, lambda: not llm.llm_engine.has_unfinished_requests(), limit=4 * cap)
        out = next(o for o in outs if o.finished).outputs[0]
        ref, reason = reference_output(tuple(prompt), cap)
        assert (list(out.token_ids), out.finish_reason) == (ref, reason) and reason == "length"
    assert not sched.trees.forks and not sched.trees.tracks and _free_blocks(llm) == free0


@pytest.mark.both_runners(v2="slow")  # minutes under Triton's interpreter
@pytest.mark.parametrize("rounds", [5, pytest.param(25, marks=pytest.mark.slow)])
def test_no_block_leaks_after_many_requests_with_aborts(llm, rounds):
    free0 = _free_blocks(llm)
    engine = llm.llm_engine
    prompts = held_out_prompts(40)
    n = 0
    for round_ in range(rounds):
        ids = []
        for i, p in enumerate(prompts):
            rid = f"leak-{round_}-{i}"
            engine.add_request(rid, {"prompt_token_ids": p}, greedy(max_tokens=60 + 37 * (i % 9)))
            ids.append(rid)
            n += 1
        for step in range(40):
            engine.step()
            if step % 7 == 3:
                engine.abort_request([ids.pop(0)])
        while engine.has_unfinished_requests():
            engine.step()
    assert n == 40 * rounds
    assert_idle(llm, free0)


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 8, 64])
def test_acceptance_200_prompts(llm, batch):
    prompts = held_out_prompts(200)
    got = []
    for i in range(0, len(prompts), batch):
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts[i : i + batch]], greedy(), use_tqdm=False)
        got += [list(o.outputs[0].token_ids) for o in outs]
    for p, g in zip(prompts, got):
        assert g == reference_output(tuple(p), MAX_TOKENS)[0]


@pytest.mark.both_runners(v2="slow")  # minutes under Triton's interpreter
def test_stop_token_ids_and_max_tokens_apply_in_text_order(llm):
    """A stop token or the max_tokens cut inside a later Path ends the text
    exactly where the sequential reference ends it."""
    from engine_harness import reference, tokenizer

    tok = tokenizer()
    path_close = tok.convert_tokens_to_ids("</Path>")
    # Four prompts whose answers hold Paths (a plain answer has none).
    prompts = [p for p in held_out_prompts(16) if path_close in reference_output(tuple(p), MAX_TOKENS)[0]][:4]
    assert len(prompts) == 4
    for p in prompts:
        ref_full, _ = reference_output(tuple(p), MAX_TOKENS)
        # A stop id that first appears inside the second Path of the text.
        second = [i for i, t in enumerate(ref_full) if t == path_close][0]
        stop = next(t for t in ref_full[second + 8 :] if t not in ref_full[: second + 8])
        for kw in ({"stop_token_ids": [stop]}, {"max_tokens": second + 20}):
            params = greedy(**({"max_tokens": MAX_TOKENS} | kw))
            out = llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0].outputs[0]
            want = reference().generate(p, max_tokens=params.max_tokens, stop_token_ids=kw.get("stop_token_ids", ()))
            assert list(out.token_ids) == want.token_ids
            assert out.finish_reason == want.finish_reason


@pytest.mark.both_runners(v2="slow")  # minutes under Triton's interpreter
def test_seeded_sampling_is_reproducible(llm):
    from vllm import SamplingParams

    p = held_out_prompts(16)[4]

    def run(seed):
        # Hot enough that this confident model's seeds actually differ.
        sp = SamplingParams(temperature=2.0, seed=seed, max_tokens=400, skip_special_tokens=False)
        return list(llm.generate([{"prompt_token_ids": p}], sp, use_tqdm=False)[0].outputs[0].token_ids)

    a, b = run(7), run(7)
    assert a == b
    assert any(run(seed) != a for seed in (8, 9, 10))


@pytest.mark.both_runners(v2="slow")  # minutes under Triton's interpreter
def test_logprobs_come_for_every_token_in_text_order(llm):
    """Sampled tokens carry the branch's own logprobs (equal to the reference's
    masked-attention logprobs); engine-written tokens carry only themselves, 0.0."""
    from engine_harness import reference

    prompts = held_out_prompts(16)[:3]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(logprobs=2), use_tqdm=False)
    for p, o in zip(prompts, outs):
        out = o.outputs[0]
        want = reference().generate(p, max_tokens=MAX_TOKENS)
        assert list(out.token_ids) == want.token_ids
        assert len(out.logprobs) == len(out.token_ids)
        assert sum(want.written) > 10  # Path and Conclusion headers
        for tok, got, written, ref_lp in zip(out.token_ids, out.logprobs, want.written, want.logprobs):
            if written:
                assert list(got) == [tok] and got[tok].logprob == 0.0
            else:
                assert len(got) >= 2 and got[tok].rank == 1
                assert got[tok].logprob == pytest.approx(ref_lp, abs=1e-3)
        assert out.cumulative_logprob == pytest.approx(sum(lp for lp in want.logprobs if lp is not None), abs=0.05)


# -- per request: what cannot be served exactly is refused, never hangs -----


@pytest.mark.parametrize(
    "kw,named",
    [
        (dict(repetition_penalty=1.2), "repetition_penalty"),
        (dict(presence_penalty=0.5), "presence_penalty"),
        (dict(frequency_penalty=0.5), "frequency_penalty"),
        (dict(min_tokens=5), "min_tokens"),
        (dict(bad_words=["x"]), "bad_words"),
        ("regex", "structured outputs"),
    ],
)
def test_history_dependent_sampling_is_refused(llm, kw, named):
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import StructuredOutputsParams

    if kw == "regex":
        kw = dict(structured_outputs=StructuredOutputsParams(regex="[\\s\\S]*"))
    with pytest.raises(VLLMValidationError, match=named) as err:  # a 400 in the server
        llm.generate([{"prompt_token_ids": held_out_prompts(16)[0]}], greedy(**kw), use_tqdm=False)
    assert "--no-multiverse-enabled" in str(err.value)
    assert not scheduler(llm).requests  # nothing reached the engine
    ok = llm.generate([{"prompt_token_ids": held_out_prompts(16)[0]}], greedy(max_tokens=8), use_tqdm=False)
    assert len(ok[0].outputs[0].token_ids) == 8


# -- interleavings -------------------------------------------------------------


def _step_until_merged(llm, name):
    """Step until the request added as ``name`` has merge copies queued (a
    merge that goes on), and return its engine id."""
    sched = scheduler(llm)
    step_until(llm, lambda: any(r.startswith(name) and r in sched.trees.copies for r in sched.requests))
    return next(r for r in sched.requests if r.startswith(name) and r in sched.trees.copies)


def test_an_abort_between_a_merge_and_its_copies_corrupts_nothing(llm):
    """The copies of a merge are sent with the next step. If the merged
    request is aborted before it, its blocks go back to the pool, which
    hands them out again in that very step (LIFO): no copy may write them."""
    sched = scheduler(llm)
    free0 = _free_blocks(llm)
    engine = llm.llm_engine
    prompts = held_out_prompts(16)
    engine.add_request("merged", {"prompt_token_ids": prompts[5]}, greedy())
    engine.add_request("other", {"prompt_token_ids": prompts[6]}, greedy())
    rid = _step_until_merged(llm, "merged")
    engine.abort_request(["merged"])
    assert rid not in sched.trees.copies  # its copies go with it
    engine.add_request("new", {"prompt_token_ids": prompts[7]}, greedy())  # allocates in the next step
    B = sched.block_size
    original = sched.schedule
    sent = []

    def checking_schedule(*args, **kwargs):
        merged = {r for r in sched.requests if r in sched.trees.copies}
        out = original(*args, **kwargs)
        owners: dict[int, set[str]] = {}
        for r in sched.requests:
            for b in sched.block_ops.table(r):
                owners.setdefault(b.block_id, set()).add(r)
        for _, dst in out.multiverse.kv_copies:
            assert owners.get(dst // B, set()) <= merged, "a merge copy writes another request's block"
        sent.append(len(out.multiverse.kv_copies))
        return out

    sched.schedule = checking_schedule
    try:
        outs = step_until(llm, lambda: not engine.has_unfinished_requests())
    finally:
        del sched.schedule
    assert sum(sent) > 0  # "other" merged too, its copies checked
    for name, p in (("other", prompts[6]), ("new", prompts[7])):
        out = next(o for o in outs if o.request_id == name and o.finished)
        assert list(out.outputs[0].token_ids) == reference_output(tuple(p), MAX_TOKENS)[0]
    assert_idle(llm, free0)


@pytest.mark.both_runners(v2="slow")  # minutes under Triton's interpreter
def test_abort_of_everything_frees_every_fork_stash_and_copy(llm):
    """vLLM's pause_scheduler("abort") (and its fault recovery) finish every
    request at once: forks in flight, stashed Paths, queued copies."""
    sched = scheduler(llm)
    free0 = _free_blocks(llm)
    engine = llm.llm_engine
    prompts = held_out_prompts(16)
    for i in range(12):
        engine.add_request(f"all-{i}", {"prompt_token_ids": prompts[i]}, greedy())
    # A merge's copies queued while other forks hold finished Paths.
    step_until(llm, lambda: sched.trees.copies and any(f.results for f in sched.trees.forks.values()))
    core = engine.engine_core.engine_core
    core.pause_scheduler(mode="abort", clear_cache=True)  # resets the prefix cache: fails if a block is held
    engine.abort_request([f"all-{i}" for i in range(12)])  # the frontend's view of them
    assert_idle(llm, free0)
    core.resume_scheduler()
    out = llm.generate([{"prompt_token_ids": prompts[0]}], greedy(), use_tqdm=False)[0].outputs[0]
    assert list(out.token_ids) == reference_output(tuple(prompts[0]), MAX_TOKENS)[0]


@pytest.mark.both_runners(v2="slow")  # minutes under Triton's interpreter
def test_request_counts_count_client_requests(llm):
    """vLLM's running/waiting counts (metrics, idle checks) count client
    requests: a parent parked at its fork is running, its branches are not
    requests of their own."""
    sched = scheduler(llm)
    engine = llm.llm_engine
    engine.add_request("count", {"prompt_token_ids": held_out_prompts(16)[8]}, greedy())
    step_until(llm, lambda: len(sched.running) >= 2)  # the branches, decoding
    assert sched.get_request_counts() == (1, 0)
    assert sched.get_num_unfinished_requests() == 1
    stats = sched.make_stats()
    assert stats is None or (stats.num_running_reqs, stats.num_waiting_reqs) == (1, 0)
    step_until(llm, lambda: not engine.has_unfinished_requests())
    assert sched.get_request_counts() == (0, 0) and sched.get_num_unfinished_requests() == 0


def test_n_parents_forking_at_once_stay_exact(llm):
    from vllm import SamplingParams

    p = held_out_prompts(16)[9]
    ref, _ = reference_output(tuple(p), MAX_TOKENS)
    if model_runner() == "v1":  # V2's top-k kernel fails under Triton's interpreter (V2_TOP_K)
        # vLLM refuses n > 1 at temperature 0; top_k=1 samples the argmax.
        greedy_n = llm.generate([{"prompt_token_ids": p}], greedy(n=3, temperature=1.0, top_k=1), use_tqdm=False)[0]
        assert [list(c.token_ids) for c in greedy_n.outputs] == [ref] * 3

    def sampled(n, seed):
        # Hot enough that seeds differ: the model is sure of most tokens.
        sp = SamplingParams(n=n, temperature=2.0, seed=seed, max_tokens=500, skip_special_tokens=False)
        return [list(c.token_ids) for c in llm.generate([{"prompt_token_ids": p}], sp, use_tqdm=False)[0].outputs]

    # vLLM gives child i the seed + i: each child is that seed's request alone.
    children = sampled(3, 11)
    assert children == [sampled(1, 11 + i)[0] for i in range(3)]
    assert len({tuple(c) for c in children}) > 1


@pytest.mark.both_runners(v2="slow")  # minutes under Triton's interpreter
def test_caps_hold_per_client_request(llm):
    """n > 1 children are one client request: together they run at most
    max_branches_per_request branches beside their siblings."""
    from dataclasses import replace

    if model_runner() == "v2":
        pytest.skip(V2_TOP_K)

    from engine_harness import tokenizer

    sched = scheduler(llm)
    tok = tokenizer()
    path_id, end_id = tok.convert_tokens_to_ids("<Path>"), tok.convert_tokens_to_ids("</Parallel>")

    def first_block_paths(p):
        ref, _ = reference_output(tuple(p), MAX_TOKENS)
        return ref[: ref.index(end_id)].count(path_id) if end_id in ref else 0

    p = next(p for p in held_out_prompts(40) if first_block_paths(p) >= 3)
    cap = first_block_paths(p) + 1  # one child's fork fits, two do not
    peak = []
    original_config, original_schedule = sched.trees.config, sched.schedule

    def recording_schedule(*args, **kwargs):
        live: dict[str, int] = {}
        for f in sched.trees.forks.values():
            if f.concurrency > 1:
                client = f.root.split("_", 1)[1]  # vLLM names child i "{i}_{request id}"
                live[client] = live.get(client, 0) + len(f.running) + len(f.pending)
        peak.append(max(live.values(), default=0))
        return original_schedule(*args, **kwargs)

    sched.trees.config = replace(original_config, max_branches_per_request=cap)
    sched.schedule = recording_schedule
    fallbacks0 = sched.trees.stats["fallbacks"]
    try:
        out = llm.generate([{"prompt_token_ids": p}], greedy(n=3, temperature=1.0, top_k=1), use_tqdm=False)[0]
    finally:
        sched.trees.config = original_config
        del sched.schedule
    assert max(peak) <= cap and sched.trees.stats["fallbacks"] > fallbacks0
    ref, _ = reference_output(tuple(p), MAX_TOKENS)
    assert [list(c.token_ids) for c in out.outputs] == [ref] * 3


# -- prefix caching after a merge --------------------------------------------


def test_a_second_turn_reads_the_merged_answer_from_the_prefix_cache(llm):
    """Merged KV is the masked computation of the merged tokens, so it is
    published under their hashes: the next chat turn, whose prompt holds the
    first answer with its structure, reads it from the cache (Conclusion
    and later text included) and continues as a cold engine does."""
    from engine_harness import tokenizer

    tok = tokenizer()
    first = held_out_prompts(16)[10]
    answer, _ = reference_output(tuple(first), MAX_TOKENS)
    out1 = llm.generate([{"prompt_token_ids": first}], greedy(), use_tqdm=False)[0].outputs[0]
    assert list(out1.token_ids) == answer
    # The chat template's turn boundary, then a second question.
    tail = tok.apply_chat_template(
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
        add_generation_prompt=True, tokenize=True,
    )
    head = tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                                   tokenize=True)
    second = first + answer + tail[len(head) - 1 :]
    warm = llm.generate([{"prompt_token_ids": second}], greedy(max_tokens=200), use_tqdm=False)[0]
    B = scheduler(llm).block_size
    assert warm.num_cached_tokens >= (len(first) + len(answer)) // B * B - B
    llm.reset_prefix_cache()
    cold = llm.generate([{"prompt_token_ids": second}], greedy(max_tokens=200), use_tqdm=False)[0]
    assert cold.num_cached_tokens == 0
    assert list(warm.outputs[0].token_ids) == list(cold.outputs[0].token_ids)
    assert list(warm.outputs[0].token_ids) == reference_output(tuple(second), 200)[0]
