"""An engine with a short max_model_len and vLLM's stats on: the model
length cuts merged text exactly where sequential decoding cuts it, and
merged outputs carry what vLLM's latency metrics need."""

import pytest
from engine_harness import greedy, held_out_prompts, reference, scheduler, tokenizer
from tree_checks import leftovers

MAX_MODEL_LEN = 640


# Runs on V1 and on Model Runner V2 (pytest --model-runner v2).
pytestmark = pytest.mark.both_runners


@pytest.fixture(scope="module")
def llm(engines, tiny_model_dir):
    return engines.get(tiny_model_dir, max_model_len=MAX_MODEL_LEN, disable_log_stats=False)


@pytest.mark.parametrize("sequential", [pytest.param(False, marks=pytest.mark.both_runners(v2="slow")), True])
def test_max_model_len_cuts_the_text_in_order(llm, sequential):
    """Each branch alone fits the model length; the merged text must stop
    where the one sequence reaches it."""
    path_id = tokenizer().convert_tokens_to_ids("<Path>")
    prompts = held_out_prompts(16)[:6]
    params = greedy(max_tokens=MAX_MODEL_LEN, extra_args={"multiverse_sequential": sequential})
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    later_path_cuts = 0
    for p, o in zip(prompts, outs):
        want = reference().generate(p, max_tokens=MAX_MODEL_LEN - len(p))
        assert list(o.outputs[0].token_ids) == want.token_ids
        assert o.outputs[0].finish_reason == want.finish_reason
        later_path_cuts += want.finish_reason == "length" and want.token_ids.count(path_id) >= 2
    assert later_path_cuts  # some cut falls past Path 1, where only the text order knows the length
    assert leftovers(scheduler(llm).trees) == {}


def _histograms(llm) -> dict[str, tuple[int, float]]:
    from vllm.v1.metrics.reader import Histogram

    out: dict[str, tuple[int, float]] = {}
    for m in llm.get_metrics():
        if isinstance(m, Histogram):
            n, s = out.get(m.name, (0, 0.0))
            out[m.name] = (n + m.count, s + m.sum)
    return out


@pytest.mark.both_runners(v2="slow")  # minutes under Triton's interpreter
def test_merged_outputs_carry_the_request_events(llm):
    """A prompt ending at </Goal> forks at once: its first output is a merge,
    and here its last too (max_tokens ends inside the block). Queue, prefill
    and first-token times come from the events that output carries."""
    from tiny_model.train import chat_prompt, held_out_tasks

    tok = tokenizer()
    task = next(t for t in held_out_tasks(16) if t.parallel)
    gold = tok.encode(task.completion(), add_special_tokens=False)
    goal = gold.index(tok.convert_tokens_to_ids("</Goal>"))
    prompt = tok.encode(chat_prompt(tok, task.prompt()), add_special_tokens=False) + gold[: goal + 1]
    sched = scheduler(llm)
    merges0 = sched.trees.stats["merges"]
    before = _histograms(llm)
    out = llm.generate([{"prompt_token_ids": prompt}], greedy(max_tokens=60), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "length" and sched.trees.stats["merges"] == merges0 + 1
    after = _histograms(llm)

    def delta(name):
        (n0, s0), (n1, s1) = before.get(name, (0, 0.0)), after[name]
        assert n1 - n0 == 1, name
        return s1 - s0

    e2e = delta("vllm:e2e_request_latency_seconds")
    queue = delta("vllm:request_queue_time_seconds")
    prefill = delta("vllm:request_prefill_time_seconds")
    ttft = delta("vllm:time_to_first_token_seconds")
    assert 0 < e2e < 60
    assert 0 <= queue <= e2e and 0 <= prefill <= e2e and 0 < ttft <= e2e
    assert delta("vllm:request_generation_tokens") == 60 and delta("vllm:request_prompt_tokens") == len(prompt)
