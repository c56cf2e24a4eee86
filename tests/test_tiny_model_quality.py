"""The bundled model, measured with the reference decoder on held-out prompts."""

import pytest
import torch
from engine_harness import reference, tokenizer

from tiny_model.evaluate import evaluate, judge
from tiny_model.train import chat_prompt, held_out_tasks


def test_bundled_model_writes_well_formed_structure(tiny_model_dir):
    tok, dec = tokenizer(), reference()
    for task in held_out_tasks(200)[:6]:
        ids = tok.encode(chat_prompt(tok, task.prompt()), add_special_tokens=False)
        out = dec.generate(ids, max_tokens=2048)
        r = judge(task, ids, out.token_ids, dec.tokens, tok)
        assert r.well_formed and out.finish_reason == "stop"
        if task.parallel:
            assert r.ideal_speedup > 1.5


@pytest.mark.slow
def test_acceptance_on_200_held_out_prompts(tiny_model_dir):
    torch.set_num_threads(2)
    summary, _ = evaluate(tiny_model_dir, 200)
    assert summary["well_formed_parallel"] >= 0.99
    assert summary["ideal_speedup_mean"] >= 2.5
    assert summary["answer_exact"] >= 0.90
