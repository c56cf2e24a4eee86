"""Ray Serve LLM with Multiverse replicas, for real: a local Ray with
bounded CPUs and memory, `serve run configs/ray-serve-tiny.yaml` (two
replicas of the tiny model behind Serve's OpenAI ingress), the official
openai client (completions and chat, streamed and not, 16 at once) against
the same greedy requests on a single in-process engine; both replicas serve,
the Multiverse counters reach Ray's metrics, and nothing of Ray is left
running afterwards. The GPU config is validated without starting it."""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from engine_harness import user_texts

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "ray-serve-tiny.yaml"
GPU_CONFIG = ROOT / "configs" / "ray-serve-multiverse-32b.yaml"
BIN = Path(sys.executable).parent
MAX_TOKENS = 1500
RAW = {"skip_special_tokens": False}


def _llm_config(path: Path) -> dict:
    app = yaml.safe_load(path.read_text())["applications"][0]
    assert app["import_path"] == "ray.serve.llm:build_openai_app"
    (cfg,) = app["args"]["llm_configs"]
    return cfg


@pytest.mark.parametrize("path", [TINY_CONFIG, GPU_CONFIG], ids=["tiny", "multiverse-32b"])
def test_serve_configs_are_valid_llm_configs(path):
    from ray.serve.llm import LLMConfig
    from vllm.engine.arg_utils import AsyncEngineArgs

    raw = _llm_config(path)
    cfg = LLMConfig(**raw)  # Serve LLM's own schema
    assert cfg.runtime_env["env_vars"]["VLLM_PLUGINS"] == "multiverse"
    kwargs = dict(raw["engine_kwargs"])
    assert "multiverse" in kwargs["additional_config"]
    # Every key is an engine argument vLLM accepts, as Serve LLM splits them.
    AsyncEngineArgs(model=str(ROOT / "models" / "multiverse-tiny"), **kwargs)
    if path == GPU_CONFIG:
        assert kwargs["tensor_parallel_size"] > 1 and kwargs["dtype"] == "bfloat16"
        assert cfg.deployment_config["autoscaling_config"]["max_replicas"] > 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_processes() -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if re.search(r"raylet|gcs_server|ray::|dashboard_agent|VLLM::", line)]


def _engines_of_ray(before: list[str]) -> list[str]:
    """Ray's processes, and vLLM engine processes that were not there before."""
    return [p for p in _ray_processes() if "VLLM::" not in p or p not in before]


def _get(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


@pytest.fixture(scope="module")
def serve_app(tmp_path_factory):
    before = _ray_processes()
    if any("VLLM::" not in p for p in before):
        pytest.fail("a Ray cluster is already running on this machine: " + before[0])
    log_dir = tmp_path_factory.mktemp("ray")
    gcs, metrics = _free_port(), _free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("VLLM_PLUGINS", "VLLM_ENABLE_V1_MULTIPROCESSING", "RAY_ADDRESS")
    }
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    # Logical CPUs: each replica asks for 2, the ingress for 1 (docs/ray.md).
    subprocess.run(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--port",
            str(gcs),
            "--num-cpus",
            "8",
            "--memory",
            str(8 * 2**30),
            "--object-store-memory",
            str(300 * 2**20),
            "--include-dashboard=false",
            "--disable-usage-stats",
            "--metrics-export-port",
            str(metrics),
        ],
        check=True,
        env=env,
        cwd=ROOT,
        capture_output=True,
    )
    serve_log = (log_dir / "serve.log").open("w")
    proc = subprocess.Popen(
        [str(BIN / "serve"), "run", "--address", f"127.0.0.1:{gcs}", str(TINY_CONFIG.relative_to(ROOT))],
        cwd=ROOT,
        env=env,
        # Ctrl-C must reach it even where this test runs with SIGINT ignored
        # (a shell's background job), which a child inherits.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        stdout=serve_log,
        stderr=subprocess.STDOUT,
    )
    base = "http://127.0.0.1:8000"
    try:
        t0 = time.time()
        while True:
            # The ingress lists the model before its replicas are up; a
            # one-token completion answers once one is.
            try:
                req = urllib.request.Request(
                    base + "/v1/completions",
                    method="POST",
                    headers={"Content-Type": "application/json"},
                    data=b'{"model": "multiverse-tiny", "prompt": "x", "max_tokens": 1}',
                )
                if urllib.request.urlopen(req, timeout=30).status == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() - t0 > 900:
                pytest.fail("the Serve app did not start:\n" + (log_dir / "serve.log").read_text()[-4000:])
            time.sleep(2)
        yield {"base": base, "metrics": f"http://127.0.0.1:{metrics}/metrics"}
    finally:
        proc.send_signal(2)  # Ctrl-C: serve run shuts the app down
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True)
        serve_log.close()
        t0 = time.time()
        while _engines_of_ray(before) and time.time() - t0 < 60:
            time.sleep(1)
        # Nothing of Ray, and none of the replicas' engines, left behind.
        assert not _engines_of_ray(before), _engines_of_ray(before)


SHARED_ENGINE = "tiny, defaults"


@pytest.fixture(scope="module")
def openai_base(serve_app):
    return serve_app["base"]


@pytest.fixture(scope="module")
def single_engine(engines, tiny_model_dir, serve_app):
    return engines.get(tiny_model_dir)


def test_serve_equals_a_single_engine(client, single_engine, serve_app):
    from engine_harness import tokenizer
    from vllm import SamplingParams

    from tiny_model.train import chat_prompt

    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, **RAW)
    texts = user_texts(16)
    want_chat = single_engine.chat([[{"role": "user", "content": t}] for t in texts], greedy, use_tqdm=False)
    prompts = [chat_prompt(tokenizer(), t) for t in texts[:2]]
    want_completion = single_engine.generate(prompts, greedy, use_tqdm=False)

    def chat(i, stream):
        kw = dict(
            model="multiverse-tiny",
            messages=[{"role": "user", "content": texts[i]}],
            temperature=0,
            max_tokens=MAX_TOKENS,
            extra_body=RAW,
        )
        if not stream:
            r = client.chat.completions.create(**kw)
            return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens
        chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        return text, finish[-1], chunks[-1].usage.completion_tokens

    # 16 at once, half of them streamed.
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda i: chat(i, stream=i % 2 == 1), range(16)))
    for (text, finish, n), w in zip(got, want_chat):
        assert text == w.outputs[0].text
        assert finish == w.outputs[0].finish_reason
        assert n == len(w.outputs[0].token_ids)
    assert sum("<Parallel>" in text for text, _, _ in got) >= 8

    for prompt, w in zip(prompts, want_completion):
        r = client.completions.create(
            model="multiverse-tiny", prompt=prompt, temperature=0, max_tokens=MAX_TOKENS, extra_body=RAW
        )
        assert r.choices[0].text == w.outputs[0].text
        chunks = list(
            client.completions.create(
                model="multiverse-tiny",
                prompt=prompt,
                temperature=0,
                max_tokens=MAX_TOKENS,
                extra_body=RAW,
                stream=True,
            )
        )
        assert "".join(c.choices[0].text for c in chunks) == w.outputs[0].text


def _series(text: str, name: str) -> dict[str, float]:
    """Ray's Prometheus export: ReplicaId -> value of metric ``name``."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            m = re.search(r'ReplicaId="([^"]*)"', line)
            out[m.group(1) if m else ""] = out.get(m.group(1) if m else "", 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def test_both_replicas_served_and_counters_are_exported(client, serve_app):
    # After test_serve_equals_a_single_engine's 20 requests (run alone:
    # send some here). Ray exports each replica's metrics every few
    # seconds, so a read can hold a fork whose merge comes with the next.
    for t in user_texts(4):
        client.chat.completions.create(
            model="multiverse-tiny", messages=[{"role": "user", "content": t}], temperature=0, max_tokens=MAX_TOKENS
        )
    t0 = time.time()
    while True:
        text = _get(serve_app["metrics"], timeout=10)
        served = {r: v for r, v in _series(text, "ray_vllm_request_success_total").items() if v > 0}
        forks = _series(text, "ray_multiverse_forks_total")
        merges = _series(text, "ray_multiverse_merges_total")
        settled = sum(forks.values()) > 0 and sum(merges.values()) == sum(forks.values())
        if (len(served) >= 2 and settled) or time.time() - t0 > 120:
            break
        time.sleep(3)
    print(f"requests per replica: {served}; forks per replica: {forks}")
    assert len(served) == 2, served
    assert sum(forks.values()) > 0, [line for line in text.splitlines() if "multiverse" in line][:10]
    assert sum(merges.values()) == sum(forks.values()), (forks, merges)


def test_a_multiverse_engine_refuses_an_unpaired_ray(monkeypatch):
    import ray

    from vllm_multiverse.vllm032 import SUPPORTED_RAY, check_ray_serve

    assert ray.__version__.startswith(SUPPORTED_RAY)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    check_ray_serve()
    monkeypatch.setattr(ray, "__version__", "2.61.0")
    with pytest.raises(RuntimeError, match=r"ray\[serve\]==2.60.0"):
        check_ray_serve()
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    check_ray_serve()  # outside Ray nothing is checked
