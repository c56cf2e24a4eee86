"""What a Multiverse engine cannot serve exactly is refused at start-up, in
the process the user started, with the feature named and the way out
(``--no-multiverse-enabled``): real vLLM engine configs of the tiny model,
``LLM(...)`` and ``vllm serve``."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from conftest import LLM_DEFAULTS, TINY_MODEL

BASE = dict(model=str(TINY_MODEL), dtype="float32", enforce_eager=True, max_model_len=2048,
            kv_cache_memory_bytes=512 * 2**20)
ROPE = {"rope_theta": 10000.0, "rope_type": "default"}

# (what the user asks for, the feature the refusal names)
REFUSED = {
    "speculative decoding": (dict(speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                                      "prompt_lookup_max": 3}), "speculative decoding"),
    "prompt embeddings": (dict(enable_prompt_embeds=True), "prompt embeddings"),
    "M-RoPE": (dict(hf_overrides={"rope_parameters": {**ROPE, "mrope_section": [8, 12, 12]}}), "M-RoPE"),
    "KV connector": (dict(kv_transfer_config={"kv_connector": "ExampleConnector", "kv_role": "kv_both"}),
                     "KV connectors"),
    "KV offloading": (dict(kv_offloading_size=1.0), "KV offloading"),
    "sliding window": (dict(hf_overrides={"sliding_window": 64, "use_sliding_window": True}), "sliding-window"),
    "mixed layers": (dict(hf_overrides={"layer_types": ["sliding_attention", "full_attention"] * 2,
                                        "sliding_window": 64}), "sliding-window"),
    "soft-capping": (dict(hf_overrides={"attn_logit_softcapping": 30.0}), "soft-capping"),
    "ALiBi": (dict(hf_overrides={"alibi": True}), "ALiBi"),
    "attention sinks": (dict(hf_overrides={"model_type": "gpt_oss"}), "attention sinks"),
    "pipeline parallelism": (dict(pipeline_parallel_size=2), "pipeline parallelism"),
    "async scheduling": (dict(async_scheduling=True), "async scheduling"),
    "logits processors": (dict(logits_processors=["vllm.v1.sample.logits_processor.builtin:MinTokensLogitsProcessor"]),
                          "logits processors"),
    "pooling": (dict(runner="pooling"), "--runner pooling"),
    "another scheduler": (dict(scheduler_cls="vllm.v1.core.sched.async_scheduler.AsyncScheduler"), "--scheduler-cls"),
    "fp8 KV": (dict(kv_cache_dtype="fp8"), "--kv-cache-dtype fp8"),
    "bf16 on CPU": (dict(dtype="bfloat16"), "bfloat16"),
    "fp16 on CPU": (dict(dtype="float16"), "float16 on CPU"),
    "head size not a multiple of 32": (dict(hf_overrides={"head_dim": 48}), "layout 'vec16'"),
    "kernel block size": (dict(block_size=16), "layout 'vec16'"),
    "FlashInfer on CPU": (dict(additional_config={"multiverse": {"masked_attention": "flashinfer"}}),
                          "--multiverse-masked-attention flashinfer on CPU"),
    "flex attention": (dict(attention_backend="FLEX_ATTENTION"), "the attention backend"),
}


@pytest.fixture(scope="module", autouse=True)
def plugin():
    from vllm_multiverse.vllm032.plugin import register

    register()


REPLAY = "forcing:ReplayLogitsProcessor"


@pytest.mark.parametrize("processors", [[REPLAY], "class"], ids=["by name", "by class"])
def test_a_multiverse_aware_logits_processor_is_accepted(processors):
    from forcing import ReplayLogitsProcessor
    from vllm.engine.arg_utils import EngineArgs

    if processors == "class":
        processors = [ReplayLogitsProcessor]
    cfg = EngineArgs(**(BASE | {"logits_processors": processors})).create_engine_config()
    assert "multiverse" in str(cfg.scheduler_config.scheduler_cls).lower()


def test_an_unaware_logits_processor_beside_an_aware_one_is_refused():
    from vllm.engine.arg_utils import EngineArgs

    from vllm_multiverse.vllm032.validate import MultiverseConfigError

    other = "vllm.v1.sample.logits_processor.builtin:MinPLogitsProcessor"
    with pytest.raises(MultiverseConfigError, match="MinPLogitsProcessor") as err:
        EngineArgs(**(BASE | {"logits_processors": [REPLAY, other]})).create_engine_config()
    assert "ReplayLogitsProcessor" not in str(err.value)


@pytest.mark.parametrize("case", list(REFUSED))
def test_start_up_refuses(case):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_multiverse.vllm032.validate import MultiverseConfigError

    kwargs, feature = REFUSED[case]
    t0 = time.monotonic()
    with pytest.raises(MultiverseConfigError) as err:
        EngineArgs(**(BASE | kwargs)).create_engine_config()
    assert time.monotonic() - t0 < 30
    msg = str(err.value)
    assert feature in msg and "--no-multiverse-enabled" in msg
    if "16" in case and "CPU" in case:
        assert "--dtype float32" in msg


def test_the_rust_frontend_is_refused(monkeypatch):
    """It bypasses vLLM's Python input processor, where each request is
    checked (``per_request.py``): the per-request refusals would vanish."""
    from vllm import envs
    from vllm.engine.arg_utils import EngineArgs

    from vllm_multiverse.vllm032.validate import MultiverseConfigError

    # An engine started earlier in this process froze vLLM's reading of the
    # environment (as a server does once it has started).
    envs.disable_envs_cache()
    monkeypatch.setenv("VLLM_USE_RUST_FRONTEND", "1")
    with pytest.raises(MultiverseConfigError, match="VLLM_USE_RUST_FRONTEND=1") as err:
        EngineArgs(**BASE).create_engine_config()
    assert "--no-multiverse-enabled" in str(err.value)
    cfg = EngineArgs(**(BASE | {"additional_config": {"multiverse": {"enabled": False}}})).create_engine_config()
    assert "multiverse" not in str(cfg.scheduler_config.scheduler_cls).lower()


_RUNNER_CHOICE = """
import json, os, sys
from vllm import envs
from vllm.engine.arg_utils import EngineArgs
from vllm_multiverse.vllm032.validate import MultiverseConfigError
base, seen = json.loads(sys.argv[1]), {}
for value in (None, "0"):
    if value is not None:
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = value
    envs.disable_envs_cache()
    try:
        seen[str(value)] = ["v2" if EngineArgs(**base).create_engine_config().use_v2_model_runner else "v1", ""]
    except MultiverseConfigError as e:
        seen[str(value)] = ["refused", str(e)]
    plain = EngineArgs(**(base | {"additional_config": {"multiverse": {"enabled": False}}}))
    seen[str(value)].append("v2" if plain.create_engine_config().use_v2_model_runner else "v1")
print("RESULT " + json.dumps(seen))
"""


def test_a_multiverse_engine_on_cpu_takes_vllms_runner_choice():
    """Where Triton has a CPU backend (triton-cpu installed; here the test
    backend of ``tests/triton_cpu``), vLLM picks Model Runner V2 on CPU by
    itself, and a Multiverse engine takes it, as a stock one does; the
    explicit 0 gives V1 to both."""
    import json

    env = os.environ.copy()
    env.pop("VLLM_USE_V2_MODEL_RUNNER", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(root, "tests", "triton_cpu"), root])
    env["TRITON_INTERPRET"] = "1"
    run = subprocess.run([sys.executable, "-c", _RUNNER_CHOICE, json.dumps(BASE)], env=env, capture_output=True,
                         text=True, timeout=300)
    line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, run.stderr[-3000:]
    seen = json.loads(line.removeprefix("RESULT "))
    assert seen["None"] == ["v2", "", "v2"]
    assert seen["0"] == ["v1", "", "v1"]


# Whole model configs of other architectures, with the tiny model's tokenizer
# and declaration (vLLM reads only the config at start-up).
OTHER_MODELS = {
    # vLLM's CPU build turns prefix caching off for MLA models.
    "MLA (prefix caching off)": ({
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "hidden_size": 128,
        "intermediate_size": 256, "moe_intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 2, "kv_lora_rank": 32, "q_lora_rank": None, "qk_rope_head_dim": 32,
        "v_head_dim": 32, "qk_nope_head_dim": 32, "n_routed_experts": 4, "num_experts_per_tok": 2,
        "n_shared_experts": 1, "first_k_dense_replace": 1, "max_position_embeddings": 2048,
    }, "vLLM turns prefix caching off"),
    "hybrid (Mamba)": ({
        "architectures": ["MambaForCausalLM"], "model_type": "mamba", "hidden_size": 128, "state_size": 16,
        "num_hidden_layers": 2,
    }, "hybrid or attention-free"),
}


@pytest.mark.parametrize("case", list(OTHER_MODELS))
def test_start_up_refuses_other_architectures(case, tmp_path):
    import json
    import shutil

    from vllm.engine.arg_utils import EngineArgs

    from vllm_multiverse.vllm032.validate import MultiverseConfigError

    tiny = json.loads((TINY_MODEL / "config.json").read_text())
    for f in TINY_MODEL.iterdir():
        if f.name.startswith("tokenizer") or f.name == "chat_template.jinja":
            shutil.copy(f, tmp_path)
    cfg, feature = OTHER_MODELS[case]
    (tmp_path / "config.json").write_text(json.dumps(
        {**cfg, "vocab_size": tiny["vocab_size"], "torch_dtype": "float32", "multiverse": tiny["multiverse"]}))
    with pytest.raises(MultiverseConfigError, match=feature) as err:
        EngineArgs(**(BASE | {"model": str(tmp_path)})).create_engine_config()
    assert "--no-multiverse-enabled" in str(err.value)


@pytest.mark.parametrize("case", ["prompt embeddings", "fp16 on CPU", "sliding window"])
def test_no_multiverse_enabled_is_the_way_out(case):
    from vllm.engine.arg_utils import EngineArgs

    kwargs, _ = REFUSED[case]
    off = {"additional_config": {"multiverse": {"enabled": False}}}
    cfg = EngineArgs(**(BASE | kwargs | off)).create_engine_config()
    assert "multiverse" not in str(cfg.scheduler_config.scheduler_cls).lower()


def test_the_settings_the_plugin_changes_are_logged(caplog):
    import logging

    from vllm.engine.arg_utils import EngineArgs

    with caplog.at_level(logging.INFO, logger="vllm"):
        cfg = EngineArgs(**(BASE | {"enable_prefix_caching": False})).create_engine_config()
    assert cfg.cache_config.enable_prefix_caching  # the machinery stays on ...
    assert cfg.additional_config["multiverse"]["prefix_caching"] is False  # ... no request reads it
    assert "no request reads the prefix cache" in caplog.text


def test_llm_refuses_before_any_engine_process_starts():
    from vllm import LLM

    from vllm_multiverse.vllm032.validate import MultiverseConfigError

    t0 = time.monotonic()
    with pytest.raises(MultiverseConfigError, match="--dtype float32"):
        LLM(model=str(TINY_MODEL), **(LLM_DEFAULTS | {"dtype": "bfloat16"}))
    assert time.monotonic() - t0 < 30


def test_vllm_serve_exits_with_the_reason():
    env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
    vllm = os.path.join(os.path.dirname(sys.executable), "vllm")
    t0 = time.monotonic()
    res = subprocess.run(
        [vllm, "serve", str(TINY_MODEL), "--plugin", "multiverse", "--dtype", "bfloat16", "--port", "8931"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert res.returncode != 0
    assert "does not support bfloat16" in res.stderr + res.stdout and "--dtype float32" in res.stderr + res.stdout
    assert time.monotonic() - t0 < 120
