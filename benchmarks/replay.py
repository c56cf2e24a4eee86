"""Replay of Multiverse transcripts: the engine's speed on a workload's shapes.

    python benchmarks/replay.py --model DIR|fixture --transcripts DIR [--batches 1 4 16 64]
                                [--dtype float32] [--repeat 3] [--runner v1|v2] [--json OUT] [--out MD]
    python benchmarks/replay.py --make-tiny DIR [--n 64]

A transcript is one text file (``*.txt``) in the authors' serialisation: the
chat text, the prompt everything through the assistant turn's start (read off
the model's chat template), the answer the rest, ending with the EOS. Every
sampled token is forced to the transcript's, branches included, by
:class:`forcing.ReplayLogitsProcessor`, so any model shape runs
the transcript's exact structure: the bundled tiny model, ``fixture`` (the
Multiverse-32B-shaped checkpoint of ``tests/multiverse32b.py``, built into a
cache directory with room for the transcripts' lengths; saved in bf16, pass
``--dtype float32`` on CPU) or a real checkpoint.

For each batch size (the first ``batch`` transcripts, repeated if there are
fewer), in one run, each configuration in its own process with its own engine
(the three engines side by side, their runs alternated):
- engine: Multiverse decoding, the Paths of a block as parallel branches;
- one at a time: the fork disabled (``{"parallel": False}``), the Paths one
  after another as branches;
- plain vLLM: the plugin off, the transcript decoded as flat text.
Ideal = output tokens / critical-path tokens (the model's Multiverse
declaration, engine positions), counted for the batch as its decode steps:
the batch's transcripts start together, so one at a time takes as many steps
as its longest answer and the engine as many as its longest critical path,
and ``ideal`` = longest answer / longest critical path, the speedup if a step
cost the same whatever it holds (at batch 1, the transcript's own ratio;
``ideal_pooled``, all output tokens / all critical-path tokens, is what the
batch's requests gain on average in latency, not in wall time);
speedup = one-at-a-time s / engine s; efficiency = speedup / ideal;
``--runner v2`` runs all three on vLLM's Model Runner V2 (on a CPU, through
the test Triton backend ``tests/triton_cpu`` and Triton's interpreter, whose
per-kernel cost makes its seconds a CPU artefact: compare tokens and ratios
within one runner); the forcing processor is the runner's own
(``forcing.processor_for``).
vs_plain = plain s / engine s; same_tokens: every configuration reproduced
every transcript token for token. One JSON
line per batch size, then a markdown table. Each batch runs ``--repeat``
rounds, a round being each configuration once, back to back: the seconds are
the median round's, the ratios the median of the rounds' own ratios.

``--make-tiny DIR`` writes the tiny model's own greedy outputs on held-out
prompts as transcripts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from side_by_side import Child

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tiny model's task (tiny_model/)
TINY = ROOT / "models" / "multiverse-tiny"
FIXTURE_CACHE = Path.home() / ".cache" / "vllm-multiverse"
CONFIGS = {"engine": {}, "one_at_a_time": {"parallel": False}, "plain": {"enabled": False}}
TRITON_CPU = ROOT / "tests" / "triton_cpu"


def runner_env(runner: str) -> dict[str, str] | None:
    """The environment of a configuration's process: vLLM's choice (V1 on
    this CPU), or Model Runner V2."""
    if runner == "v1":
        return None
    env = dict(os.environ, VLLM_USE_V2_MODEL_RUNNER="1")
    if not torch_has_cuda():
        # vLLM picks V2 on a CPU where Triton reports a CPU backend.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TRITON_CPU), env.get("PYTHONPATH")]))
        env["TRITON_INTERPRET"] = "1"
    return env


def torch_has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# -- transcripts ----------------------------------------------------------------


def assistant_turn(tok) -> str:
    """The text the chat template puts before an assistant's answer: what
    the generation prompt adds to a conversation."""
    msgs = [{"role": "user", "content": "x"}]
    with_turn = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    without = tok.apply_chat_template(msgs, add_generation_prompt=False, tokenize=False)
    if not with_turn.startswith(without) or with_turn == without:
        raise ValueError("the chat template's generation prompt does not extend the conversation")
    return with_turn[len(without) :]


def eos_ids(tok, model_dir: Path) -> set[int]:
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    gen = model_dir / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids


def read_transcript(text: str, tok, turn: str, eos: set[int]) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids): the prompt through the last assistant turn's
    start, the answer through its first EOS."""
    cut = text.rfind(turn)
    if cut < 0:
        raise ValueError(f"no assistant turn ({turn!r}) in the transcript")
    cut += len(turn)
    prompt = tok.encode(text[:cut], add_special_tokens=False)
    answer = tok.encode(text[cut:], add_special_tokens=False)
    end = next((i + 1 for i, t in enumerate(answer) if t in eos), len(answer))
    return prompt, answer[:end]


def load_transcripts(directory: Path, tok, model_dir: Path) -> list[tuple[list[int], list[int]]]:
    files = sorted(directory.glob("*.txt"))
    if not files:
        raise SystemExit(f"no *.txt transcripts in {directory}")
    turn, eos = assistant_turn(tok), eos_ids(tok, model_dir)
    return [read_transcript(f.read_text(), tok, turn, eos) for f in files]


# -- models ---------------------------------------------------------------------


def model_dir(name: str, transcripts: Path) -> Path:
    """A checkpoint directory; ``fixture`` builds the Multiverse-32B-shaped
    one, with positions for the longest transcript."""
    if name != "fixture":
        return Path(name)
    sys.path.insert(0, str(ROOT / "tests"))
    import multiverse32b

    tmp = FIXTURE_CACHE / "multiverse-32b-shaped-tokenizer"
    if not (tmp / "tokenizer.json").exists():
        tmp.mkdir(parents=True, exist_ok=True)
        multiverse32b.write_tokenizer(tmp)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp)
    longest = max(len(p) + len(a) for p, a in load_transcripts(transcripts, tok, tmp))
    positions = max(4096, -(-(longest + 64) // 4096) * 4096)
    out = FIXTURE_CACHE / f"multiverse-32b-shaped-{positions}"
    if not (out / "model.safetensors").exists():
        multiverse32b.build(out, max_positions=positions)
    return out


def kv_bytes_per_token(model: Path, dtype: str) -> int:
    cfg = json.loads((model / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    width = 4 if dtype == "float32" else 2
    return 2 * cfg["num_hidden_layers"] * cfg.get("num_key_value_heads", heads) * head_dim * width


# -- one configuration ----------------------------------------------------------


def serve_config(mode: str, args) -> None:
    """Runs in a child process: one engine, a batch size per line of stdin,
    a ``RESULT`` line each."""
    import torch
    from forcing import processor_for, replay_args
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from tiny_model.evaluate import critical_path
    from vllm_multiverse.model_config import model_declaration, read_model_declaration

    model = Path(args.model)
    transcripts = load_transcripts(args.transcripts, AutoTokenizer.from_pretrained(model), model)
    largest = [transcripts[i % len(transcripts)] for i in range(max(args.batches))]
    longest = max(len(p) + len(a) for p, a in transcripts)
    kv = int(1.5 * sum(len(p) + len(a) for p, a in largest) * kv_bytes_per_token(model, args.dtype))
    llm = LLM(
        model=str(model), dtype=args.dtype, enforce_eager=not torch.cuda.is_available(),
        max_model_len=longest + 64, kv_cache_memory_bytes=max(kv, 512 << 20), seed=0,
        generation_config="vllm", logits_processors=[processor_for(args.runner == "v2")],
        additional_config={"multiverse": CONFIGS[mode]},
    )
    info = read_model_declaration({"multiverse": model_declaration(model)})
    llm.generate([{"prompt_token_ids": transcripts[0][0]}], SamplingParams(max_tokens=8), use_tqdm=False)
    print("READY", flush=True)
    for line in sys.stdin:
        batch = [transcripts[i % len(transcripts)] for i in range(int(line))]
        sps = [SamplingParams(temperature=0.0, max_tokens=len(a), skip_special_tokens=False,
                              extra_args=replay_args(len(p), a)) for p, a in batch]
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p, _ in batch], sps, use_tqdm=False)
        seconds = time.perf_counter() - t0
        ids = [list(o.outputs[0].token_ids) for o in outs]
        critical = [critical_path(p + x, len(p), info.tokens) for (p, _), x in zip(batch, ids)]
        result = {
            "seconds": seconds, "tokens": sum(map(len, ids)), "critical": sum(critical),
            "longest": max(map(len, ids)), "longest_critical": max(critical),
            "same": all(x == a for (_, a), x in zip(batch, ids)),
        }
        print("RESULT " + json.dumps(result), flush=True)


def measure(args) -> dict[str, dict[str, list[dict]]]:
    """mode -> batch -> one result per round; in a round each configuration
    runs once, back to back, in a rotating order, so that a machine whose
    speed drifts slows a round's three runs alike."""
    cmd = [__file__, "--model", str(args.model), "--transcripts", str(args.transcripts),
           "--batches", *map(str, args.batches), "--dtype", args.dtype, "--runner", args.runner]
    children = [Child(mode, [*cmd, "--child", mode], env=runner_env(args.runner)) for mode in CONFIGS]
    try:
        for c in children:
            c.wait_for("READY")
        runs: dict[str, dict[str, list[dict]]] = {mode: {} for mode in CONFIGS}
        for b in args.batches:
            for r in range(args.repeat):
                for c in children[r % 3 :] + children[: r % 3]:
                    runs[c.name].setdefault(str(b), []).append(c.run(str(b)))
        return runs
    finally:
        for c in children:
            c.close()


def summary(b: str, engine: dict, seq: dict, plain: dict) -> dict:
    """Seconds: the median round; ratios: the median of the rounds' own
    ratios (each from three runs side by side)."""
    e, s, p = engine[b], seq[b], plain[b]
    first = e[0]
    ideal = first["longest"] / first["longest_critical"]
    speedup = statistics.median(x["seconds"] / y["seconds"] for x, y in zip(s, e))
    vs_plain = statistics.median(x["seconds"] / y["seconds"] for x, y in zip(p, e))
    sec = {name: statistics.median(x["seconds"] for x in runs) for name, runs in (("e", e), ("s", s), ("p", p))}
    return {
        "batch": int(b), "tokens": first["tokens"], "rounds": len(e),
        "ideal_pooled": round(first["tokens"] / first["critical"], 4),
        "engine_s": round(sec["e"], 3), "one_at_a_time_s": round(sec["s"], 3), "plain_s": round(sec["p"], 3),
        "engine_tok_s": round(first["tokens"] / sec["e"], 1),
        "one_at_a_time_tok_s": round(s[0]["tokens"] / sec["s"], 1),
        "plain_tok_s": round(p[0]["tokens"] / sec["p"], 1),
        "ideal": round(ideal, 4), "speedup": round(speedup, 4), "efficiency": round(speedup / ideal, 4),
        "vs_plain": round(vs_plain, 4), "same_tokens": all(x["same"] for x in e + s + p),
    }


def table(rows: list[dict]) -> str:
    lines = ["| batch | tokens | engine s | engine tok/s | one-at-a-time s | one-at-a-time tok/s | plain vLLM s | "
             "plain tok/s | ideal | speedup | efficiency | vs plain | same tokens |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['tokens']} | {r['engine_s']:.2f} | {r['engine_tok_s']:.0f} | "
            f"{r['one_at_a_time_s']:.2f} | "
            f"{r['one_at_a_time_tok_s']:.0f} | {r['plain_s']:.2f} | {r['plain_tok_s']:.0f} | {r['ideal']:.3f} | "
            f"{r['speedup']:.3f} | {r['efficiency']:.3f} | {r['vs_plain']:.3f} | {r['same_tokens']} |"
        )
    return "\n".join(lines)


# -- the tiny model's own transcripts ---------------------------------------------


def make_tiny(out: Path, n: int) -> None:
    from vllm import LLM, SamplingParams

    from tiny_model.train import chat_prompt, held_out_tasks

    llm = LLM(
        model=str(TINY), dtype="float32", enforce_eager=True, max_model_len=2048, kv_cache_memory_bytes=1 << 30, seed=0
    )
    tok = llm.get_tokenizer()
    texts = [chat_prompt(tok, t.prompt()) for t in held_out_tasks(n)]
    prompts = [tok.encode(t, add_special_tokens=False) for t in texts]
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(temperature=0.0, max_tokens=1500, skip_special_tokens=False),
        use_tqdm=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    turn, eos = assistant_turn(tok), eos_ids(tok, TINY)
    changed = []
    for i, (text, prompt, o) in enumerate(zip(texts, prompts, outs)):
        ids = list(o.outputs[0].token_ids)
        transcript = text + tok.decode(ids, skip_special_tokens=False)
        (out / f"{i:03d}.txt").write_text(transcript)
        if read_transcript(transcript, tok, turn, eos) != (prompt, ids):
            changed.append(i)
    print(f"{n} transcripts in {out}; tokenized back differently: {changed or 'none'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(TINY), help="a checkpoint directory, or 'fixture'")
    ap.add_argument("--transcripts", type=Path)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeat", type=int, default=3, help="rounds per batch (each configuration once)")
    ap.add_argument("--runner", choices=("v1", "v2"), default="v1", help="vLLM's model runner (v2: Model Runner V2)")
    ap.add_argument("--json", type=Path, help="write the JSON lines here")
    ap.add_argument("--out", type=Path, help="write the markdown table here")
    ap.add_argument("--make-tiny", type=Path, metavar="DIR")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.make_tiny:
        make_tiny(args.make_tiny, args.n)
        return
    if args.transcripts is None:
        ap.error("--transcripts is required")
    if args.child:
        serve_config(args.child, args)
        return
    args.model = model_dir(args.model, args.transcripts)
    best = measure(args)
    rows = [summary(str(b), *(best[mode] for mode in CONFIGS)) for b in args.batches]
    for r in rows:
        print(json.dumps(r))
    md = table(rows)
    print(md)
    if args.json:
        args.json.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if args.out:
        args.out.write_text(
            f"# Transcript replay ({args.model.name}, {args.transcripts})\n\n"
            f"`python benchmarks/replay.py --model {args.model} --transcripts {args.transcripts} "
            f"--batches {' '.join(map(str, args.batches))}` (median of {args.repeat} rounds per batch)\n\n{md}\n"
        )


if __name__ == "__main__":
    main()
