"""`vllm serve models/multiverse-tiny --plugin multiverse`, a real server
process, driven with the official openai client: the same greedy outputs as
the offline `LLM`, streaming and not, completions and chat, concurrent
streams, and vLLM's usual errors for bad requests."""

import asyncio

import pytest
from conftest import TINY_MODEL, environ
from engine_harness import tokenizer, user_texts

MAX_TOKENS = 1500
RAW = {"skip_special_tokens": False}  # the full structure, tags included


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    from tiny_model.demo import start_server

    log = tmp_path_factory.mktemp("serve") / "server.log"
    try:
        # Dev mode: the /pause and /resume endpoints RL trainers use.
        with environ("VLLM_SERVER_DEV_MODE", "1"):
            proc, base = start_server(log, ("--seed", "0", "--multiverse-max-paths-per-fork", "16"), progress=False)
    except RuntimeError as e:
        pytest.fail(str(e))
    yield {"base": base, "proc": proc, "log": log}
    proc.terminate()
    try:
        assert proc.wait(timeout=60) == 0 or proc.returncode == -15
    finally:
        proc.kill()


SHARED_ENGINE = "tiny, defaults"


@pytest.fixture(scope="module")
def openai_base(server):
    return server["base"]


@pytest.fixture(scope="module")
def offline(engines, tiny_model_dir, server):
    return engines.get(tiny_model_dir)


def _chat_prompt(text):
    from tiny_model.train import chat_prompt

    return chat_prompt(tokenizer(), text)


def test_completions_equal_offline_outputs(client, offline):
    from vllm import SamplingParams

    texts = [_chat_prompt(t) for t in user_texts(3)]
    want = offline.generate(texts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, **RAW), use_tqdm=False)
    for text, w in zip(texts, want):
        got = client.completions.create(model=str(TINY_MODEL), prompt=text, temperature=0,
                                        max_tokens=MAX_TOKENS, extra_body=RAW)
        assert got.choices[0].text == w.outputs[0].text
        assert "<Parallel>" in got.choices[0].text
        assert got.usage.completion_tokens == len(w.outputs[0].token_ids)
        assert got.usage.prompt_tokens == len(w.prompt_token_ids)
        stream = client.completions.create(model=str(TINY_MODEL), prompt=text, temperature=0,
                                           max_tokens=MAX_TOKENS, extra_body=RAW, stream=True)
        chunks = list(stream)
        assert "".join(c.choices[0].text for c in chunks) == w.outputs[0].text
        assert chunks[-1].choices[0].finish_reason == w.outputs[0].finish_reason


def test_chat_equals_offline_chat_and_hides_tags_by_default(client, offline):
    from vllm import SamplingParams

    for text in user_texts(2):
        messages = [{"role": "user", "content": text}]
        want = offline.chat(messages, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)[0]
        got = client.chat.completions.create(model=str(TINY_MODEL), messages=messages, temperature=0,
                                             max_tokens=MAX_TOKENS)
        assert got.choices[0].message.content == want.outputs[0].text
        assert "<Parallel>" not in got.choices[0].message.content  # special tokens stripped, as in vLLM
        stream = client.chat.completions.create(model=str(TINY_MODEL), messages=messages, temperature=0,
                                                max_tokens=MAX_TOKENS, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream) == want.outputs[0].text


def test_n_stop_max_tokens_and_logprobs(client):
    text = _chat_prompt(user_texts(1)[0])
    full = client.completions.create(model=str(TINY_MODEL), prompt=text, temperature=0, max_tokens=MAX_TOKENS,
                                     extra_body=RAW).choices[0].text
    cut = client.completions.create(model=str(TINY_MODEL), prompt=text, temperature=0, max_tokens=40,
                                    extra_body=RAW, logprobs=2)
    c = cut.choices[0]
    assert cut.usage.completion_tokens == 40 and c.finish_reason == "length"
    assert full.startswith(c.text) and len(c.logprobs.tokens) == 40
    stop = client.completions.create(model=str(TINY_MODEL), prompt=text, temperature=0, max_tokens=MAX_TOKENS,
                                     extra_body=RAW, stop=["</Path>"])
    assert stop.choices[0].text == full[: full.index("</Path>")]
    many = client.completions.create(model=str(TINY_MODEL), prompt=text, temperature=1.0, seed=3, n=3,
                                     max_tokens=MAX_TOKENS, extra_body=RAW)
    # vLLM gives child i the seed + i: each choice is that seed's request alone.
    alone = [client.completions.create(model=str(TINY_MODEL), prompt=text, temperature=1.0, seed=3 + i,
                                       max_tokens=MAX_TOKENS, extra_body=RAW).choices[0].text for i in range(3)]
    assert [ch.text for ch in sorted(many.choices, key=lambda c: c.index)] == alone


def test_32_concurrent_streams_complete(server):
    from openai import AsyncOpenAI
    from transformers import AutoConfig

    from vllm_multiverse.model_config import read_model_declaration
    from vllm_multiverse.structure import analyze

    mv = read_model_declaration(AutoConfig.from_pretrained(TINY_MODEL)).tokens
    texts = [_chat_prompt(t) for t in user_texts(16)] * 2

    async def one(client, text):
        stream = await client.completions.create(model=str(TINY_MODEL), prompt=text, temperature=0,
                                                 max_tokens=MAX_TOKENS, extra_body=RAW, stream=True)
        parts, finish = [], None
        async for chunk in stream:
            parts.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        return "".join(parts), finish

    async def main():
        client = AsyncOpenAI(base_url=server["base"] + "/v1", api_key="none", timeout=600)
        return await asyncio.gather(*(one(client, t) for t in texts))

    results = asyncio.run(main())
    assert len(results) == 32
    for text, finish in results:
        assert finish == "stop"
        ids = tokenizer().encode(text, add_special_tokens=False)
        assert analyze(ids, mv).well_formed
    assert results[:16] == results[16:]  # the same prompt, the same answer, whatever the batch


def test_bad_requests_get_errors_and_the_server_keeps_serving(client, server):
    import openai

    text = _chat_prompt(user_texts(1)[0])
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=str(TINY_MODEL), prompt="1 " * 5000, max_tokens=10)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=str(TINY_MODEL), prompt=text, temperature=-1.0, max_tokens=10)
    # A client that goes away mid-stream: the request is aborted, nothing hangs.
    stream = client.completions.create(model=str(TINY_MODEL), prompt=text, temperature=0, max_tokens=MAX_TOKENS,
                                       extra_body=RAW, stream=True)
    for i, _ in enumerate(stream):
        if i == 40:
            break
    stream.close()
    ok = client.completions.create(model=str(TINY_MODEL), prompt=text, temperature=0, max_tokens=20, extra_body=RAW)
    assert ok.usage.completion_tokens == 20
    assert server["proc"].poll() is None


def _multiverse_metrics(base):
    """The server's multiverse:* samples, summed over labels other than ``reason``."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
    got = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            if s.name.startswith("multiverse:") and not s.name.endswith("_created"):
                key = s.name + (f"{{{s.labels['reason']}}}" if "reason" in s.labels else "")
                if "le" in s.labels:
                    key += f"{{le={s.labels['le']}}}"
                got[key] = got.get(key, 0) + s.value
    return got


def test_metrics_count_the_forks_the_requests_cause(client, server):
    """Forks, merges, Paths per fork and parallel tokens at /metrics equal
    what the returned texts show: one fork and one merge per Parallel block,
    one Path per <Path>, and every Path token after its engine-written
    header sampled in parallel (prompts without a nested block)."""
    import re
    import time

    from tiny_model.train import held_out_tasks

    tasks = [t for t in held_out_tasks(16) if t.parallel and t.split is None][:3]
    before = _multiverse_metrics(server["base"])
    assert "multiverse:forks_total" in before  # exported from the start
    texts = [client.completions.create(model=str(TINY_MODEL), prompt=_chat_prompt(t.prompt()), temperature=0,
                                       max_tokens=MAX_TOKENS, extra_body=RAW).choices[0].text for t in tasks]
    blocks = sum(t.count("<Parallel>") for t in texts)
    paths = [len(re.findall(r"<Path>", block)) for t in texts for block in t.split("<Parallel>")[1:]]
    path_bodies = [m for t in texts for m in re.findall(r"<Path>\n[0-9.]+:(.*?</Path>\n)", t, re.S)]
    sampled = sum(len(tokenizer().encode(b, add_special_tokens=False)) for b in path_bodies)
    assert blocks >= 3 and len(path_bodies) == sum(paths)
    want = {
        "multiverse:forks_total": blocks,
        "multiverse:merges_total": blocks,
        "multiverse:paths_per_fork_count": blocks,
        "multiverse:paths_per_fork_sum": sum(paths),
        "multiverse:paths_per_fork_bucket{le=4.0}": sum(n <= 4 for n in paths),
        "multiverse:fallbacks_total{caps}": 0,
        "multiverse:fallbacks_total{kv_cache}": 0,
        "multiverse:parallel_tokens_total": sampled,
    }
    deadline = time.time() + 20  # stats reach the API server with the engine's next output
    while True:
        after = _multiverse_metrics(server["base"])
        got = {k: after.get(k, 0) - before.get(k, 0) for k in want}
        if got == want or time.time() > deadline:
            break
        time.sleep(0.5)
    assert got == want


def test_what_cannot_be_served_exactly_is_a_400_not_a_hang(client):
    """The request a user tried: structured outputs on a prompt that calls
    for a Parallel block used to hang (its branches waited for a grammar)."""
    import time

    import openai

    messages = [{"role": "user", "content": user_texts(1)[0]}]
    for extra in ({"structured_outputs": {"regex": "[\\s\\S]*"}}, {"repetition_penalty": 1.1}, {"min_tokens": 3}):
        t0 = time.monotonic()
        with pytest.raises(openai.BadRequestError, match="Multiverse engine does not support"):
            client.chat.completions.create(model=str(TINY_MODEL), messages=messages, max_tokens=MAX_TOKENS,
                                           extra_body=extra, timeout=60)
        assert time.monotonic() - t0 < 10
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        client.completions.create(model=str(TINY_MODEL), prompt="x", presence_penalty=0.5, max_tokens=5)
    ok = client.chat.completions.create(model=str(TINY_MODEL), messages=messages, max_tokens=20)
    assert ok.usage.completion_tokens == 20


def _streams_in_flight(server, texts):
    """Start one streamed completion per text; return once each has sent
    its </Goal> (a fork in flight), with the threads' results to come."""
    import threading

    from openai import OpenAI

    client = OpenAI(base_url=server["base"] + "/v1", api_key="none", timeout=600)
    results = [None] * len(texts)
    forked = [threading.Event() for _ in texts]

    def run(i):
        parts, finish = [], None
        stream = client.completions.create(model=str(TINY_MODEL), prompt=texts[i], temperature=0,
                                           max_tokens=MAX_TOKENS, extra_body=RAW, stream=True)
        for chunk in stream:
            parts.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
            if "</Goal>" in "".join(parts):
                forked[i].set()
        forked[i].set()
        results[i] = ("".join(parts), finish)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for e in forked:
        assert e.wait(120)
    return threads, results


def _post(base, path):
    import json
    import urllib.request

    req = urllib.request.Request(base + path, method="POST")
    with urllib.request.urlopen(req, timeout=300) as r:
        return r.status, json.loads(r.read())


def test_pause_wait_drains_forks_in_flight(server, client, offline):
    from vllm import SamplingParams

    texts = [_chat_prompt(t) for t in user_texts(4)]
    threads, results = _streams_in_flight(server, texts)
    assert _post(server["base"], "/pause?mode=wait&clear_cache=false") == (200, {"status": "paused"})
    for t in threads:
        t.join(60)
    want = offline.generate(texts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, **RAW), use_tqdm=False)
    assert results == [(w.outputs[0].text, "stop") for w in want]
    assert _post(server["base"], "/resume") == (200, {"status": "resumed"})
    ok = client.completions.create(model=str(TINY_MODEL), prompt=texts[0], temperature=0, max_tokens=MAX_TOKENS,
                                   extra_body=RAW)
    assert ok.choices[0].text == want[0].outputs[0].text


def test_pause_abort_with_forks_in_flight_frees_everything(server, client):
    import time
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from tiny_model.tasks import held_out_tasks

    # Parallel prompts only: a plain answer can end before the pause.
    texts = [_chat_prompt(t.prompt()) for t in held_out_tasks(16) if t.parallel][:6]
    threads, results = _streams_in_flight(server, texts)
    # Aborts them all, then resets the prefix cache: that fails if any block is still held.
    assert _post(server["base"], "/pause?mode=abort") == (200, {"status": "paused"})
    for t in threads:
        t.join(60)
    assert all(r is not None and r[1] == "abort" for r in results)
    assert _post(server["base"], "/resume") == (200, {"status": "resumed"})
    deadline = time.time() + 20
    while True:
        body = urllib.request.urlopen(server["base"] + "/metrics", timeout=30).read().decode()
        usage = [s.value for f in text_string_to_metric_families(body) for s in f.samples
                 if s.name == "vllm:kv_cache_usage_perc"]
        if usage == [0.0] or time.time() > deadline:
            break
        time.sleep(0.5)
    assert usage == [0.0]
    ok = client.completions.create(model=str(TINY_MODEL), prompt=texts[0], temperature=0, max_tokens=30, extra_body=RAW)
    assert ok.usage.completion_tokens == 30
