"""10,000 mixed requests through one engine whose KV cache is small enough
to preempt: plain and Multiverse prompts, prompts holding Parallel blocks,
sequential mode, streamed and not, about a fifth aborted at random moments
(some between a merge and the step that runs its copies). Afterwards no
block is leaked and the plugin keeps nothing; a sampled subset of the
finished greedy outputs equals the reference decoder's."""

import random

import pytest
from engine_harness import greedy, held_out_prompts, reference_output, scheduler, tokenizer
from tree_checks import leftovers

pytestmark = pytest.mark.slow

N = int(__import__("os").environ.get("MULTIVERSE_SOAK_N", 10_000))
IN_FLIGHT = 64
KV_BYTES = 32 * 2**20  # 61 blocks of 128 tokens: a batch of forks preempts
# max_tokens, mostly short: many requests end inside a block or a Path.
MAX_TOKENS = (40,) * 4 + (150,) * 3 + (400,) * 2 + (1500,)
CHECKED = 200


@pytest.fixture(scope="module")
def llm(engines, tiny_model_dir):
    return engines.get(tiny_model_dir, kv_cache_memory_bytes=KV_BYTES)


def _prompts() -> list[list[int]]:
    """Held-out prompts, plain and parallel, and continuations of gold
    answers cut inside their blocks."""
    from tiny_model.train import chat_prompt, held_out_tasks

    tok = tokenizer()
    out = held_out_prompts(60)
    for t in held_out_tasks(60)[:20]:
        base = tok.encode(chat_prompt(tok, t.prompt()), add_special_tokens=False)
        gold = tok.encode(t.completion(), add_special_tokens=False)
        out += [base + gold[: len(gold) * f // 5] for f in (1, 2, 3)]
    return out


def test_soak_10000_mixed_requests(llm):
    from vllm.sampling_params import RequestOutputKind

    rng = random.Random(0)
    sched = scheduler(llm)
    engine = llm.llm_engine
    pool = sched.kv_cache_manager.block_pool
    free0 = pool.get_num_free_blocks()
    prompts = _prompts()
    live: dict[str, dict] = {}
    done: dict[str, dict] = {}
    added = aborted = aborted_after_merge = steps = 0
    while added < N or live:
        while added < N and len(live) < IN_FLIGHT:
            rid = f"s{added}"
            p = rng.choice(prompts)
            mt = rng.choice(MAX_TOKENS)
            stream = rng.random() < 0.5
            seq = rng.random() < 0.1
            sp = greedy(max_tokens=mt, extra_args={"multiverse_sequential": seq},
                        output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY)
            engine.add_request(rid, {"prompt_token_ids": p}, sp)
            live[rid] = {"prompt": p, "max_tokens": mt, "tokens": [], "abort_at": steps + rng.randint(1, 400)
                         if rng.random() < 0.2 else None}
            added += 1
            if added % 1000 == 0:
                print(f"soak: {added} added, {len(done)} finished, {aborted} aborted, {steps} steps", flush=True)
        for o in engine.step():
            req = live.get(o.request_id)
            if req is None:
                continue
            req["tokens"] += list(o.outputs[0].token_ids)
            if o.finished:
                req["finish"] = o.outputs[0].finish_reason
                done[o.request_id] = live.pop(o.request_id)
        steps += 1
        just_merged = {r.split("-")[0] for r in sched.requests if r in sched.trees.copies}
        to_abort = [rid for rid, r in live.items() if r["abort_at"] is not None and steps >= r["abort_at"]]
        to_abort += [rid for rid in just_merged if rid in live and rng.random() < 0.05]
        if to_abort:
            to_abort = sorted(set(to_abort))
            aborted_after_merge += len(set(to_abort) & just_merged)
            engine.abort_request(to_abort)
            for rid in to_abort:
                live.pop(rid)
            aborted += len(to_abort)
    assert added == N and aborted > N // 8 and aborted_after_merge > 0
    assert sched.trees.stats["preemptions"] > 0 and sched.trees.stats["merges"] > 0
    assert not engine.has_unfinished_requests()
    assert not sched.requests and leftovers(sched.trees) == {}
    assert pool.get_num_free_blocks() == free0
    finished = sorted(done)
    for rid in rng.sample(finished, min(CHECKED, len(finished))):
        r = done[rid]
        want, reason = reference_output(tuple(r["prompt"]), r["max_tokens"])
        assert (r["tokens"], r["finish"]) == (want, reason), rid
    print(f"soak: {added} requests, {len(done)} finished, {aborted} aborted ({aborted_after_merge} right after "
          f"a merge), {steps} steps, stats {dict(sched.trees.stats)}")
