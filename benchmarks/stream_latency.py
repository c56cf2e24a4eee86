"""Streaming latency of `vllm serve --plugin multiverse` on the tiny model:
time to first token, inter-token latency and the longest gap between
chunks, for streamed chat requests on held-out prompts with Parallel
blocks, at batch 1 and 16 (all sent at once), in one server run.

    python benchmarks/stream_latency.py [--batches 1 16] [--repeat 2]

Gaps are measured between chunks that carry text; a Parallel block that is
delivered whole at its merge shows as a long gap.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tiny model's task (tiny_model/)


async def one(client, model: str, text: str) -> dict:
    t0 = time.perf_counter()
    times, tokens = [], 0
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], temperature=0, max_tokens=1500, stream=True,
        stream_options={"include_usage": True}, extra_body={"skip_special_tokens": False},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    gaps = [b - a for a, b in zip(times, times[1:])]
    return {
        "ttft": times[0] - t0,
        "itl": (times[-1] - times[0]) / max(1, tokens - 1),
        "max_gap": max(gaps, default=0.0),
        "chunks": len(times),
        "tokens": tokens,
    }


async def batch(base: str, model: str, texts: list[str]) -> list[dict]:
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=base + "/v1", api_key="none", timeout=900) as client:
        return await asyncio.gather(*(one(client, model, t) for t in texts))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    from tiny_model.demo import MODEL_DIR, start_server
    from tiny_model.train import held_out_tasks

    texts = [t.prompt() for t in held_out_tasks(200) if t.parallel][: max(args.batches)]
    proc, base = start_server(Path(tempfile.mkdtemp(prefix="mv-stream-")) / "server.log", progress=False)
    try:
        asyncio.run(batch(base, str(MODEL_DIR), texts[:2]))  # warm-up
        print(
            "| batch | TTFT ms (mean) | inter-token ms (mean) | longest gap ms (mean / max) | chunks per request "
            "| tokens per request |"
        )
        print("|---|---|---|---|---|---|")
        for n in args.batches:
            runs = [asyncio.run(batch(base, str(MODEL_DIR), texts[:n])) for _ in range(args.repeat)]
            rs = [r for run in runs for r in run]
            print(
                f"| {n} | {1e3 * statistics.mean(r['ttft'] for r in rs):.0f} "
                f"| {1e3 * statistics.mean(r['itl'] for r in rs):.1f} "
                f"| {1e3 * statistics.mean(r['max_gap'] for r in rs):.0f} / {1e3 * max(r['max_gap'] for r in rs):.0f} "
                f"| {statistics.mean(r['chunks'] for r in rs):.0f} | {statistics.mean(r['tokens'] for r in rs):.0f} |"
            )
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
