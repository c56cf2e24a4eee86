"""The Multiverse attention backend's masked path through vllm.LLM on the
tiny model: sequential decoding, prompts that hold Parallel blocks, and the
compact mask it is sent, all against the reference decoder. The module's
engines (prefix caching on, then off) run sequential decoding by default
(the plugin option) and force chunked prefill small."""

import pytest
from engine_harness import MAX_TOKENS, greedy, held_out_prompts, reference, reference_output, scheduler, tokenizer

PARALLEL = {"multiverse_sequential": False}


# Runs on V1 and on Model Runner V2 (pytest --model-runner v2).
pytestmark = pytest.mark.both_runners


@pytest.fixture(
    scope="module",
    # Prefix caching off on V2: test_engine_pressure.py's engine, in the default share.
    params=[True, pytest.param(False, marks=pytest.mark.both_runners(v2="slow"))],
    ids=["prefix-caching-on", "prefix-caching-off"],
)
def llm(engines, tiny_model_dir, request):
    return engines.get(
        tiny_model_dir,
        max_num_batched_tokens=64,
        enable_prefix_caching=request.param,
        additional_config={"multiverse": {"sequential": True}},
    )


def masked_rows(llm) -> int:
    """Query tokens the scheduler sent with a mask."""
    return scheduler(llm).trees.stats["masked_tokens"]


def test_compact_mask_expands_to_the_structure_rule(tiny_model_dir):
    """What the scheduler sends (rectangles from each token's recorded hidden
    ranges), expanded by the runner, is the structure rule's dense mask."""

    import numpy as np
    from transformers import AutoConfig

    from tiny_model.train import held_out_tasks
    from vllm_multiverse.kernels.packed_mask import allowed_rows
    from vllm_multiverse.model_config import read_model_declaration
    from vllm_multiverse.structure import StructureState, analyze
    from vllm_multiverse.tree import Limits, Track

    tok = tokenizer()
    mv = read_model_declaration(AutoConfig.from_pretrained(tiny_model_dir)).tokens
    task = next(t for t in held_out_tasks(50) if t.split is not None)
    seq = tok.encode(task.completion(), add_special_tokens=False)
    track = Track(StructureState(mv), root="r", client="r", limits=Limits(len(seq)))
    track.extend(seq)
    dense = analyze(seq, mv).dense_mask()
    n = len(seq)
    assert (dense != np.tri(n, dtype=bool)).any()  # nested Paths are masked
    for start, end in [(0, n), (0, 64), (100, 164), (n - 1, n), (n // 2, n)]:
        rows = allowed_rows(track.rects_for(start, end), start, end).numpy()
        assert (rows == dense[start:end, :end]).all()


def test_sequential_equals_the_reference_and_uses_the_mask(llm):
    sched = scheduler(llm)
    forks0, rows0 = sched.trees.stats["forks"], masked_rows(llm)
    prompts = held_out_prompts(16)[:8]
    for chunk in [prompts[:1], prompts[1:2], prompts]:  # alone, and a batch of 8
        outs = llm.generate([{"prompt_token_ids": p} for p in chunk], greedy(), use_tqdm=False)
        for p, o in zip(chunk, outs):
            assert list(o.outputs[0].token_ids) == reference_output(tuple(p), MAX_TOKENS)[0]
    assert sched.trees.stats["forks"] == forks0  # no branch at all
    assert masked_rows(llm) > rows0


@pytest.mark.both_runners(v2="slow")  # minutes under Triton's interpreter
def test_sequential_on_the_sdpa_route_equals_the_reference(llm, monkeypatch):
    """Where the CPU kernel is absent, the masked rows go through SDPA over
    K/V gathered by the block ids the runner reads off vLLM's table."""
    from vllm_multiverse.vllm032 import attention

    calls = []
    real = attention.sdpa_masked_rows
    monkeypatch.setattr(attention.MaskedRowsImpl, "route", "sdpa")
    monkeypatch.setattr(attention, "sdpa_masked_rows", lambda *a: calls.append(1) or real(*a))
    prompts = held_out_prompts(16)[8:12]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(), use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert list(o.outputs[0].token_ids) == reference_output(tuple(p), MAX_TOKENS)[0]
    assert calls


@pytest.mark.both_runners(v2="slow")  # minutes under Triton's interpreter
def test_per_request_parallel_equals_sequential(llm):
    sched = scheduler(llm)
    forks0 = sched.trees.stats["forks"]
    prompts = held_out_prompts(16)[8:12]
    par = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(extra_args=PARALLEL), use_tqdm=False)
    seq = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(), use_tqdm=False)
    assert sched.trees.stats["forks"] > forks0
    for a, b in zip(par, seq):
        assert list(a.outputs[0].token_ids) == list(b.outputs[0].token_ids)


def _cut_after(tokens: list[int], tag: str, nth: int = 0, extra: int = 2) -> list[int]:
    tid = tokenizer().convert_tokens_to_ids(tag)
    at = [i for i, t in enumerate(tokens) if t == tid][nth]
    return tokens[: at + 1 + extra]


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_prompt_holding_parallel_blocks_continues_like_the_reference(llm, mode):
    """A client sends back a structured answer so far: a complete block, and
    one that stops inside a nested block's outer Path."""
    from tiny_model.train import chat_prompt, held_out_tasks

    tok = tokenizer()
    task = next(t for t in held_out_tasks(50) if t.split is not None)
    base = tok.encode(chat_prompt(tok, task.prompt()), add_special_tokens=False)
    gold = tok.encode(task.completion(), add_special_tokens=False)
    # The first </Parallel> closes the nested block, inside the outer Path.
    prompts = [base + _cut_after(gold, "</Parallel>", 0), base + _cut_after(gold, "</Parallel>", -1)]
    params = greedy(extra_args=PARALLEL if mode == "parallel" else None)
    rows0 = masked_rows(llm)
    for p in prompts:
        out = llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0].outputs[0]
        want = reference().generate(p, max_tokens=MAX_TOKENS)
        assert list(out.token_ids) == want.token_ids
    assert masked_rows(llm) > rows0


@pytest.mark.both_runners(v2="slow")  # minutes under Triton's interpreter
def test_sequential_logprobs(llm):
    p = held_out_prompts(16)[0]
    out = llm.generate([{"prompt_token_ids": p}], greedy(logprobs=1), use_tqdm=False)[0].outputs[0]
    want = reference().generate(p, max_tokens=MAX_TOKENS)
    assert list(out.token_ids) == want.token_ids and len(out.logprobs) == len(want.token_ids)
    for tok, got, written, ref_lp in zip(out.token_ids, out.logprobs, want.written, want.logprobs):
        if written:
            assert list(got) == [tok] and got[tok].logprob == 0.0
        else:
            assert got[tok].logprob == pytest.approx(ref_lp, abs=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 32])
def test_acceptance_sequential_200_prompts(llm, batch):
    prompts = held_out_prompts(200)
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        outs = llm.generate([{"prompt_token_ids": p} for p in chunk], greedy(), use_tqdm=False)
        for p, o in zip(chunk, outs):
            assert list(o.outputs[0].token_ids) == reference_output(tuple(p), MAX_TOKENS)[0]
