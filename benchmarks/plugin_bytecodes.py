"""Python bytecodes executed per engine step in the plugin's own code
(vllm_multiverse/ frames only; the vLLM code it calls is not counted), and
in vLLM's scheduler (vllm/v1/core/sched/) for scale: deterministic, so load
on the machine does not move it (docs/benchmark.md).

    python benchmarks/plugin_bytecodes.py [N] [plain|parallel]
    VLLM_PLUGINS=none python benchmarks/plugin_bytecodes.py 32 plain   # stock vLLM

N tiny-model held-out prompts without (plain) or with Parallel blocks,
greedy, stepped by hand with the engine core in this process.
"""
import json
import os
import statistics
import sys
from collections import Counter

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tiny model's task (tiny_model/)

TINY = str(Path(__file__).resolve().parents[1] / "models" / "multiverse-tiny")


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 32
    kind = sys.argv[2] if len(sys.argv) > 2 else "plain"
    from vllm import LLM, SamplingParams

    plugin = os.environ.get("VLLM_PLUGINS") != "none"
    if plugin:
        from vllm_multiverse.vllm032.plugin import register

        register()
    llm = LLM(model=TINY, dtype="float32", enforce_eager=True, max_model_len=2048,
              kv_cache_memory_bytes=1 << 30, seed=0)
    tok = llm.get_tokenizer()
    from tiny_model.train import chat_prompt, held_out_tasks

    tasks = [t for t in held_out_tasks(400) if bool(t.parallel) == (kind == "parallel")]
    texts = ([chat_prompt(tok, t.prompt()) for t in tasks] * n)[:n]
    prompts = [{"prompt_token_ids": tok.encode(t, add_special_tokens=False)} for t in texts]
    sp = SamplingParams(temperature=0.0, max_tokens=1500 if kind == "parallel" else 512, skip_special_tokens=False)
    llm.generate(prompts[:1], SamplingParams(max_tokens=8), use_tqdm=False)
    engine = llm.llm_engine
    counts = Counter()
    funcs = Counter()

    def local(frame, event, arg):
        if event == "opcode":
            f = frame.f_code.co_filename
            counts[f] += 1
            if "vllm_multiverse" in f:
                funcs[frame.f_code.co_qualname] += 1
        return local

    def glob(frame, event, arg):
        f = frame.f_code.co_filename
        if "vllm_multiverse" in f or "/v1/core/sched/" in f:
            frame.f_trace_opcodes = True
            return local
        return None

    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, sp)
    per_step = []
    outs = []
    sch = engine.engine_core.engine_core.scheduler
    mvs = getattr(sch, "mv", None)
    quiet = []  # plugin bytecodes of steps with no fork open before or after
    while engine.has_unfinished_requests():
        before = (bool(mvs.forks), mvs.stats["forks"], mvs.stats["merges"]) if mvs else None
        counts.clear()
        sys.settrace(glob)
        try:
            got = engine.step()
        finally:
            sys.settrace(None)
        outs += [o for o in got if o.finished]
        mv = sum(v for f, v in counts.items() if "vllm_multiverse" in f)
        sched = sum(v for f, v in counts.items() if "/v1/core/sched/" in f)
        per_step.append((mv, sched))
        if mvs and before == (False, mvs.stats["forks"], mvs.stats["merges"]) and not mvs.forks:
            quiet.append(mv)
    ntok = sum(len(o.outputs[0].token_ids) for o in outs)
    mv = [a for a, _ in per_step]
    row = {"plugin": plugin, "kind": kind, "requests": n, "steps": len(per_step), "tokens": ntok,
           "plugin_ops_per_step_median": statistics.median(mv), "plugin_ops_per_step_mean": round(statistics.mean(mv)),
           "plugin_ops_total": sum(mv),
           "quiet_steps": len(quiet), "plugin_ops_quiet_median": statistics.median(quiet) if quiet else None,
           "vllm_sched_ops_per_step_median": statistics.median(s for _, s in per_step),
           "top_plugin_funcs": funcs.most_common(25)}
    print("ROW " + json.dumps(row), flush=True)
    import hashlib
    print(
        "IDS",
        hashlib.sha1(
            json.dumps(sorted([o.request_id, list(o.outputs[0].token_ids)] for o in outs)).encode()
        ).hexdigest(),
    )
    llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
