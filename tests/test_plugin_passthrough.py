"""A model without Multiverse tags behaves exactly as in stock vLLM."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "greedy_ids.py"


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tiny_model.tokenizer import build_tokenizer

    path = tmp_path_factory.mktemp("plain-qwen2")
    torch.manual_seed(1)
    tok = build_tokenizer(tags=False)  # no Multiverse tags: not a Multiverse model
    cfg = Qwen2Config(vocab_size=120, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=tok.eos_token_id)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    assert "multiverse" not in json.loads((path / "config.json").read_text())
    return path


def _start(model, plugins):
    env = dict(os.environ)
    env.pop("VLLM_PLUGINS", None)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    if plugins is not None:
        env["VLLM_PLUGINS"] = plugins
    return subprocess.Popen([sys.executable, str(SCRIPT), str(model), "24"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc):
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]), out + err


def test_non_multiverse_model_is_untouched(plain_model):
    # Both engines at once: each spends its start-up mostly on one core.
    procs = _start(plain_model, None), _start(plain_model, "none")
    (with_plugin, log), (without, log2) = (_result(p) for p in procs)
    assert "vllm-multiverse" in log and "plugin loaded" in log
    assert "Multiverse decoding on" not in log
    assert "plugin loaded" not in log2
    assert with_plugin == without
    assert any(len(ids) == 48 for ids in with_plugin)
