"""A checkpoint shaped like the published Multiverse-32B (Qwen2, Qwen2.5's
byte-level BPE with the twelve tags at 151665-151676, bf16 weights, no
``config.json["multiverse"]``) served as it is: recognised from its
tokenizer, labels read right whatever BPE merges around them, and the same
greedy tokens in parallel mode, sequential mode and the reference decoder,
through ``LLM`` and through ``vllm serve`` with the ``openai`` client."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from multiverse32b import GOAL_CLOSE, PATH_CLOSE

BODY = (
    "<Think>\nFirst, the easy part.\nLet's think in parallel.\n<Parallel>\n<Goal>\n"
    "<Outline>\n1: Count the even terms.\n</Outline>\n"
    "<Outline>\n2:\nSum the odd terms.\n</Outline>\n"
    "</Goal>\n"
    "<Path>\n1: The even terms are 2, 4 and 6.\nLet's think in parallel.\n<Parallel>\n<Goal>\n"
    "<Outline>\n1.1: the first two\n</Outline>\n<Outline>\n1.2:\nthe last\n</Outline>\n</Goal>\n"
    "<Path>\n1.1: 2 and 4\n</Path>\n"
    "<Path>\n1.2: 6, in two steps.\nLet's think in parallel.\n<Parallel>\n<Goal>\n"
    "<Outline>\n1.2.1: half\n</Outline>\n<Outline>\n1.2.2: double\n</Outline>\n</Goal>\n"
    "<Path>\n1.2.1: 3\n</Path>\n<Path>\n1.2.2: 6\n</Path>\n<Conclusion>\n6\n</Conclusion>\n</Parallel>\n"
    "</Path>\n<Conclusion>\nThree even terms.\n</Conclusion>\n"
    "</Parallel>\nSo 3.\n</Path>\n"
    "<Path>\n2: 1 + 3 + 5 = 9.\n</Path>\n"
    "<Conclusion>\n3 even terms; the odd ones sum to 9.\n</Conclusion>\n</Parallel>\n"
    "Then check both.\nLet's think in parallel.\n<Parallel>\n<Goal>\n"
    "<Outline> 11: the count\n</Outline>\n<Outline>\n12 : the sum\n</Outline>\n</Goal>\n"
    "<Path>\n11: 3 is right.\n</Path>\n<Path>\n12: 9 is right.\n</Path>\n"
    "<Conclusion>\nBoth hold.\n</Conclusion>\n</Parallel>\n</Think>\n\nAnswer: 3, 9"
)
# Where a client's continuation may start: (name, text the prompt ends with)
CUTS = {
    "inside the Goal": "<Outline>\n2:",
    "at </Goal>": "</Goal>",
    "inside Path 1": "The even terms are 2,",
    "inside a nested Path": "1.2.1: 3",
    "at a nested </Goal>": "1.2.2: double\n</Outline>\n</Goal>",
    "between the Paths": "So 3.\n</Path>\n",
    "inside a later Path": "2: 1 + 3",
    "inside the Conclusion": "3 even terms;",
    "inside a later block's Path": "12: 9 is",
}
MAX_TOKENS = 40


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _prompt(tok, cut: str) -> list[int]:
    head = tok.apply_chat_template([{"role": "user", "content": "Count and sum. Think in parallel."}],
                                   add_generation_prompt=True, tokenize=False)
    return tok.encode(head + BODY[: BODY.index(cut) + len(cut)], add_special_tokens=False)


# -- the tokenizer: recognition and labels --------------------------------------


def test_the_declaration_is_derived_from_the_tokenizer(mv32b_dir):
    from vllm_multiverse.model_config import derive_declaration

    entry = derive_declaration(_tokenizer(mv32b_dir))
    t = entry["tokens"]
    assert (t["goal_close"], t["path_close"]) == (GOAL_CLOSE, PATH_CLOSE)
    assert (t["think_open"], t["conclusion_close"]) == (151665, 151676)
    assert entry["path_header"] == "\n<Path>\n{label}" and entry["conclusion_header"] == "<Conclusion>\n"
    assert entry["positions"] == "engine"


@pytest.mark.parametrize(
    "outlines,labels",
    [
        ("<Outline>\n1: a goal\n</Outline>\n<Outline>\n2: b\n</Outline>\n", ["1", "2"]),  # "1:" then a space
        ("<Outline>\n1:\na goal\n</Outline>\n", ["1"]),  # ":\n" is one token (510)
        ("<Outline>\n12: twelve\n</Outline>\n", ["12"]),
        ("<Outline>\n2.1: x\n</Outline>\n<Outline>\n2.2:\ny\n</Outline>\n", ["2.1", "2.2"]),
        ("<Outline>\n1.2.3: deep\n</Outline>\n", ["1.2.3"]),
        ("<Outline> 1: after a space\n</Outline>\n", ["1"]),
        ("<Outline>1: no newline\n</Outline>\n", ["1"]),
        ("<Outline>\n1 : spaced colon\n</Outline>\n", ["1"]),  # " :" is one token
        ("<Outline>\n1:**bold**\n</Outline>\n", ["1"]),  # ":**" is one token
        ("<Outline>\nno label\n</Outline>\n<Outline>\n3: three\n</Outline>\n", ["3"]),
    ],
)
def test_labels_are_read_whatever_bpe_merges(mv32b_dir, outlines, labels):
    from vllm_multiverse.model_config import derive_declaration, read_model_declaration
    from vllm_multiverse.structure import EventKind, StructureState

    tok = _tokenizer(mv32b_dir)
    mv = read_model_declaration({"multiverse": derive_declaration(tok)}).tokens
    state = StructureState(mv)
    for i in tok.encode("<Parallel>\n<Goal>\n" + outlines + "</Goal>", add_special_tokens=False):
        ev = state.append(i)
    assert ev is not None and ev.kind is EventKind.FORK
    # The header the engine writes is what training text starts a Path with.
    assert [list(h) for h in ev.branch_headers] == [
        tok.encode(f"\n<Path>\n{label}:", add_special_tokens=False) for label in labels
    ]


def test_some_tags_but_not_all_is_an_error_when_asked_for_and_plain_otherwise(mv32b_dir, tmp_path):
    import shutil

    from vllm.engine.arg_utils import EngineArgs

    from vllm_multiverse.vllm032.plugin import register

    register()
    partial = tmp_path / "partial"
    shutil.copytree(mv32b_dir, partial)
    tok = json.loads((partial / "tokenizer.json").read_text())
    for a in tok["added_tokens"]:
        if a["content"] in ("<Outline>", "</Outline>"):
            a["special"] = False
    (partial / "tokenizer.json").write_text(json.dumps(tok))
    cfg = json.loads((partial / "tokenizer_config.json").read_text())
    cfg["additional_special_tokens"] = [t for t in cfg["additional_special_tokens"] if "Outline" not in t]
    for v in cfg["added_tokens_decoder"].values():
        if "Outline" in v["content"]:
            v["special"] = False
    (partial / "tokenizer_config.json").write_text(json.dumps(cfg))
    base = dict(model=str(partial), dtype="float32", max_model_len=2048, enforce_eager=True)
    plain = EngineArgs(**base).create_engine_config()
    assert "multiverse" not in str(plain.scheduler_config.scheduler_cls).lower()
    with pytest.raises(ValueError, match="Outline"):
        EngineArgs(**base, additional_config={"multiverse": {"enabled": True}}).create_engine_config()


def test_a_bf16_checkpoint_on_cpu_needs_dtype_float32(mv32b_dir):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_multiverse.vllm032.plugin import register
    from vllm_multiverse.vllm032.validate import MultiverseConfigError

    register()
    with pytest.raises(MultiverseConfigError, match="--dtype float32"):
        EngineArgs(model=str(mv32b_dir), max_model_len=2048, enforce_eager=True).create_engine_config()


def test_no_multiverse_enabled_gives_plain_vllm(mv32b_dir):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_multiverse.vllm032.plugin import register

    register()
    cfg = EngineArgs(model=str(mv32b_dir), dtype="float32", max_model_len=2048, enforce_eager=True,
                     additional_config={"multiverse": {"enabled": False}}).create_engine_config()
    assert "multiverse" not in str(cfg.scheduler_config.scheduler_cls).lower()
    assert getattr(cfg.model_config.hf_config, "multiverse", None) is None


def test_a_declaration_wins_over_the_derivation(mv32b_dir, tmp_path):
    """--hf-overrides '{"multiverse": ...}' or config.json["multiverse"]
    (written by vllm-multiverse declare --write) is what the engine reads."""
    import shutil

    from vllm.engine.arg_utils import EngineArgs

    from vllm_multiverse.model_config import derive_declaration
    from vllm_multiverse.vllm032.plugin import register

    register()
    base = dict(dtype="float32", max_model_len=2048, enforce_eager=True)
    entry = {**derive_declaration(_tokenizer(mv32b_dir)), "positions": "training"}
    cfg = EngineArgs(model=str(mv32b_dir), hf_overrides={"multiverse": entry}, **base).create_engine_config()
    assert cfg.model_config.hf_config.multiverse["positions"] == "training"
    copy = tmp_path / "declared"
    shutil.copytree(mv32b_dir, copy)
    script = Path(sys.executable).with_name("vllm-multiverse")
    out = subprocess.run([str(script), "declare", str(copy), "--positions", "training", "--write"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads((copy / "config.json").read_text())["multiverse"] == entry == json.loads(out.stdout)
    cfg = EngineArgs(model=str(copy), **base).create_engine_config()
    assert cfg.model_config.hf_config.multiverse == entry


# -- the engine, through LLM ------------------------------------------------------


@pytest.fixture(scope="module")
def llm(engines, mv32b_dir):
    return engines.get(mv32b_dir, max_num_batched_tokens=128)


@pytest.fixture(scope="module")
def reference(mv32b_dir):
    import torch

    from vllm_multiverse.reference import ReferenceDecoder

    torch.set_num_threads(2)
    return ReferenceDecoder.from_pretrained(mv32b_dir)


@pytest.mark.both_runners
def test_recognised_with_no_flag_and_no_file_changed(llm, mv32b_dir):
    from vllm_multiverse.vllm032.scheduler import MultiverseScheduler

    sched = llm.llm_engine.engine_core.engine_core.scheduler
    assert isinstance(sched, MultiverseScheduler)
    assert "multiverse" not in json.loads((mv32b_dir / "config.json").read_text())
    derived = llm.llm_engine.vllm_config.model_config.hf_config.multiverse
    # vllm-multiverse declare prints the declaration the engine derived.
    script = Path(sys.executable).with_name("vllm-multiverse")
    out = subprocess.run([str(script), "declare", str(mv32b_dir)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == derived
    assert "multiverse" not in json.loads((mv32b_dir / "config.json").read_text())  # printing writes nothing
    # The checkpoint's repetition_penalty default is not applied (Paths have no shared history).
    assert llm.get_default_sampling_params().repetition_penalty == 1.0


def _greedy(max_tokens=MAX_TOKENS, **kw):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, skip_special_tokens=False, **kw)


@pytest.mark.both_runners
def test_a_prompt_ending_at_goal_close_forks_at_once(llm, mv32b_dir, reference):
    tok = _tokenizer(mv32b_dir)
    prompt = _prompt(tok, "</Goal>")
    sched = llm.llm_engine.engine_core.engine_core.scheduler
    forks0 = sched.trees.stats["forks"]
    out = llm.generate([{"prompt_token_ids": prompt}], _greedy(), use_tqdm=False)[0].outputs[0]
    header = tok.encode("\n<Path>\n1:", add_special_tokens=False)
    assert list(out.token_ids[: len(header)]) == header
    assert sched.trees.stats["forks"] == forks0 + 1
    assert list(out.token_ids) == reference.generate(prompt, max_tokens=MAX_TOKENS).token_ids


@pytest.mark.both_runners(v2="slow")  # V2 samples over the 151,680-token vocabulary in Triton's interpreter
@pytest.mark.parametrize("cut", list(CUTS))
def test_continuations_agree_in_parallel_sequential_and_the_reference(llm, mv32b_dir, reference, cut):
    tok = _tokenizer(mv32b_dir)
    prompt = _prompt(tok, CUTS[cut])
    want = reference.generate(prompt, max_tokens=MAX_TOKENS)
    for sequential in (False, True):
        out = llm.generate([{"prompt_token_ids": prompt}],
                           _greedy(extra_args={"multiverse_sequential": sequential}), use_tqdm=False)[0].outputs[0]
        assert list(out.token_ids) == want.token_ids, (cut, sequential)
        assert out.finish_reason == want.finish_reason


# -- the server --------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(mv32b_dir, tmp_path_factory, llm):
    from tiny_model.demo import start_server

    log = tmp_path_factory.mktemp("serve32b") / "server.log"
    try:
        proc, base = start_server(log, progress=False, model=mv32b_dir, kv_cache_bytes=256 * 2**20)
    except RuntimeError as e:
        pytest.fail(str(e))
    yield {"base": base, "log": log}
    proc.terminate()
    proc.wait(timeout=60)


def test_vllm_serve_recognises_and_forks(server, mv32b_dir, llm):
    import urllib.request

    from openai import OpenAI

    tok = _tokenizer(mv32b_dir)
    log = server["log"].read_text()
    assert "derived from its tokenizer" in log and "positions 'engine'" in log
    assert "repetition_penalty=1.05; not applied" in log

    def forks() -> float:
        body = urllib.request.urlopen(server["base"] + "/metrics", timeout=30).read().decode()
        return sum(float(line.split()[-1]) for line in body.splitlines() if line.startswith("multiverse:forks_total"))

    client = OpenAI(base_url=server["base"] + "/v1", api_key="none", timeout=300)
    before = forks()
    prompt = tok.decode(_prompt(tok, "</Goal>"))
    got = client.completions.create(model=str(mv32b_dir), prompt=prompt, temperature=0, max_tokens=MAX_TOKENS,
                                    extra_body={"skip_special_tokens": False})
    assert got.choices[0].text.startswith("\n<Path>\n1:")
    want = llm.generate([{"prompt_token_ids": _prompt(tok, "</Goal>")}], _greedy(), use_tqdm=False)[0].outputs[0]
    assert got.choices[0].text == want.text
    deadline = time.time() + 20
    while forks() < before + 1 and time.time() < deadline:
        time.sleep(0.5)
    assert forks() == before + 1
    # A default chat request (the checkpoint's sampling defaults) is served, not refused.
    chat = client.chat.completions.create(model=str(mv32b_dir), messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=8)
    assert chat.usage.completion_tokens == 8
