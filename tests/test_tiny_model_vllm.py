"""The shipped tiny model loads and generates in vLLM's CPU build (plugin
inactive), and agrees with the reference where no Multiverse rule applies."""

import pytest
from conftest import LLM_DEFAULTS, environ

from tiny_model.train import chat_prompt, held_out_tasks
from vllm_multiverse.reference import ReferenceDecoder


@pytest.fixture(scope="module")
def plain_llm(tiny_model_dir):
    from vllm import LLM

    # Off twice over: no plugin in the engine's processes (an allow-list
    # naming none), and off for this engine should another test have
    # registered the plugin in this process.
    with environ("VLLM_PLUGINS", "none"):
        llm = LLM(model=str(tiny_model_dir), additional_config={"multiverse": {"enabled": False}}, **LLM_DEFAULTS)
        yield llm
        llm.llm_engine.engine_core.shutdown()


def test_vllm_generates_plain_answers_like_the_reference(plain_llm, tiny_model_dir):
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ref = ReferenceDecoder.from_pretrained(tiny_model_dir)
    plain = [t for t in held_out_tasks(200) if not t.parallel][:4]
    assert plain
    prompts = [tok.encode(chat_prompt(tok, t.prompt()), add_special_tokens=False) for t in plain]
    outs = plain_llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(temperature=0.0, max_tokens=200, skip_special_tokens=False),
    )
    for p, o in zip(prompts, outs):
        # No Parallel block in a plain answer: vLLM's causal decoding is the
        # Multiverse decoding, token for token.
        assert list(o.outputs[0].token_ids) == ref.generate(p, max_tokens=200).token_ids
        assert o.outputs[0].finish_reason == "stop"


def test_vllm_generates_structured_text(plain_llm, tiny_model_dir):
    from vllm import SamplingParams

    task = next(t for t in held_out_tasks(200) if t.parallel)
    out = plain_llm.chat(
        [{"role": "user", "content": task.prompt()}],
        SamplingParams(temperature=0.0, max_tokens=1500, skip_special_tokens=False),
    )
    text = out[0].outputs[0].text
    # Without the plugin nothing masks the Paths or writes headers, but the
    # model still writes its structure: vLLM ran it.
    assert text.startswith("<Think>\nLet's think in parallel.\n<Parallel>\n<Goal>")
    from vllm_multiverse.vllm032.scheduler import MultiverseScheduler

    assert MultiverseScheduler.__name__ not in str(plain_llm.llm_engine.vllm_config.scheduler_config.scheduler_cls)
