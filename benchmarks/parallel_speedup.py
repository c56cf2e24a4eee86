"""Parallel decoding speed of the Multiverse engine on the tiny model.

    python benchmarks/parallel_speedup.py [--batches 1 4 16 64] [--out docs/benchmark.md]

For each batch size, on held-out prompts, in one run:
- engine: Multiverse decoding, Paths of a block as parallel branches;
- one at a time: the same outputs with every block's Paths run one after
  another as branches (fork disabled), one token per step per request;
- sequential: the attention backend's sequential decoding (no branches, the
  Paths one after another in one sequence, masked);
- plain vLLM: the plugin off, greedy decoding of as many tokens per prompt
  (ignore_eos, max_tokens = the engine's output length).
Parallel efficiency = measured speedup (one-at-a-time time / engine time)
divided by the ideal speedup (output tokens / critical-path tokens).
Each configuration runs in its own process (its own engine); each batch runs
``--repeat`` times and the fastest run counts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tiny model's task (tiny_model/)
MODEL = ROOT / "models" / "multiverse-tiny"


def run_config(mode: str, batches: list[int], n_max: int, lengths: dict | None, repeat: int) -> dict:
    """Runs in a child process: one engine, every batch size."""
    from vllm import LLM, SamplingParams

    from tiny_model.evaluate import critical_path
    from tiny_model.train import chat_prompt, held_out_tasks

    extra = {
        "engine": {},
        "one_at_a_time": {"parallel": False},
        "sequential": {"sequential": True},
        "plain": {"enabled": False},
    }[mode]
    llm = LLM(model=str(MODEL), dtype="float32", enforce_eager=True, max_model_len=2048,
              kv_cache_memory_bytes=1 << 30, seed=0, additional_config={"multiverse": extra})
    tok = llm.get_tokenizer()
    prompts = [tok.encode(chat_prompt(tok, t.prompt()), add_special_tokens=False)
               for t in held_out_tasks(n_max)]
    from vllm_multiverse.model_config import read_model_declaration

    info = read_model_declaration(json.loads((MODEL / "config.json").read_text()))
    llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=8), use_tqdm=False)
    results = {}
    for b in batches:
        batch = prompts[:b]
        if mode == "plain":
            sps = [SamplingParams(temperature=0.0, max_tokens=lengths[str(b)][i], ignore_eos=True)
                   for i in range(b)]
        else:
            sps = [SamplingParams(temperature=0.0, max_tokens=1500, skip_special_tokens=False)] * b
        dt = float("inf")
        for _ in range(repeat):  # the fastest of a few runs: these machines are noisy
            t0 = time.perf_counter()
            outs = llm.generate([{"prompt_token_ids": p} for p in batch], sps, use_tqdm=False)
            dt = min(dt, time.perf_counter() - t0)
        ids = [list(o.outputs[0].token_ids) for o in outs]
        n_out = sum(len(x) for x in ids)
        crit = sum(critical_path(p + x, len(p), info.tokens) for p, x in zip(batch, ids))
        results[str(b)] = {"seconds": dt, "tokens": n_out, "critical": crit,
                           "lengths": [len(x) for x in ids], "ids": ids}
    return results


def child(mode: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--batches", *map(str, args.batches),
           "--repeat", str(args.repeat)]
    if args.lengths:
        cmd += ["--lengths", args.lengths]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{res.stderr[-4000:]}")
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--repeat", type=int, default=3, help="runs per batch; the fastest counts")
    ap.add_argument("--child")
    ap.add_argument("--lengths")
    args = ap.parse_args()
    if args.child:
        lengths = json.loads(Path(args.lengths).read_text()) if args.lengths else None
        print("RESULT " + json.dumps(run_config(args.child, args.batches, max(args.batches), lengths, args.repeat)))
        return
    engine = child("engine", args)
    seq = child("one_at_a_time", args)
    masked = child("sequential", args)
    tmp = Path("/tmp/mv_lengths.json")
    tmp.write_text(json.dumps({b: engine[b]["lengths"] for b in engine}))
    args.lengths = str(tmp)
    plain = child("plain", args)
    rows = [
        "| batch | engine s | engine tok/s | one-at-a-time s | one-at-a-time tok/s | sequential s | sequential tok/s "
        "| plain vLLM s | plain tok/s | speedup | ideal | efficiency | same tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b in map(str, args.batches):
        e, s, m, p = engine[b], seq[b], masked[b], plain[b]
        speedup = s["seconds"] / e["seconds"]
        ideal = e["tokens"] / e["critical"]
        rows.append(
            f"| {b} | {e['seconds']:.2f} | {e['tokens'] / e['seconds']:.0f} | {s['seconds']:.2f} | "
            f"{s['tokens'] / s['seconds']:.0f} | {m['seconds']:.2f} | {m['tokens'] / m['seconds']:.0f} | "
            f"{p['seconds']:.2f} | {p['tokens'] / p['seconds']:.0f} | "
            f"{speedup:.2f} | {ideal:.2f} | {speedup / ideal:.2f} | {e['ids'] == s['ids'] == m['ids']} |"
        )
    table = "\n".join(rows)
    print(table)
    if args.out:
        args.out.write_text(
            "# Parallel speedup (tiny model, 2 CPU cores)\n\n"
            f"`python benchmarks/parallel_speedup.py` (fastest of {args.repeat} runs per batch)\n\n{table}\n"
        )


if __name__ == "__main__":
    main()
