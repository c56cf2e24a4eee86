"""Wall time of one engine step by kind: the tiny model on held-out prompts
with Parallel blocks, greedy, at batch 1 and 16, through vllm.LLM's engine
stepped by hand (engine core in this process).

    python benchmarks/step_cost.py [--batches 1 16] [--prompts 4]

A step is classed by what the Multiverse scheduler did in it (first match):
- ``merge``: a fork merged (text laid out, the parent re-queued with its
  KV copies planned);
- ``after merge``: the next step (the KV copies run before the forward; the
  parent computes its Conclusion header);
- ``fork``: a request sampled ``</Goal>`` and was parked at its fork;
- ``after fork``: the next step (the branches start on the shared prefix
  and compute their headers);
- ``inside``: forks open, none forked or merged;
- ``outside``: no fork open (Multiverse requests outside their blocks);
- ``prefill``: a step that schedules a prompt (excluded from the rest).

For each kind: the median wall ms of ``LLMEngine.step()`` (scheduler,
runner, output processing), the median CPU ms of the scheduler's own calls
(``schedule`` + ``update_from_output``), and the extra wall cost over an
``outside`` step that ran as many sequences (the median of those; the
nearest batch where none ran exactly as many).
"""

from __future__ import annotations

import argparse
import bisect
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

from vllm_multiverse.tree import is_branch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tiny model's task (tiny_model/)
TINY = ROOT / "models" / "multiverse-tiny"
KINDS = ("outside", "inside", "fork", "after fork", "merge", "after merge", "prefill")


class StepProbe:
    """Wraps the scheduler's two per-step calls: what a step scheduled, what
    it forked and merged, and the CPU time spent in them."""

    def __init__(self, sched) -> None:
        self.sched = sched
        self.reset()
        schedule, update = sched.schedule, sched.update_from_output

        def timed_schedule(*args, **kwargs):
            t0 = time.thread_time_ns()
            out = schedule(*args, **kwargs)
            self.cpu_ns += time.thread_time_ns() - t0
            self.seqs = len(out.num_scheduled_tokens)
            # Branches are new requests to the runner too; prompts are the rest.
            self.prefill = any(not is_branch(r.req_id) for r in out.scheduled_new_reqs)
            return out

        def timed_update(*args, **kwargs):
            t0 = time.thread_time_ns()
            try:
                return update(*args, **kwargs)
            finally:
                self.cpu_ns += time.thread_time_ns() - t0

        sched.schedule, sched.update_from_output = timed_schedule, timed_update

    def reset(self) -> None:
        self.cpu_ns, self.seqs, self.prefill = 0, 0, False


def run_batch(llm, prompts: list[list[int]], params) -> list[dict]:
    engine = llm.llm_engine
    sched = engine.engine_core.engine_core.scheduler
    probe = StepProbe(sched)
    stats = sched.trees.stats
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, params)
    steps, last = [], None
    while engine.has_unfinished_requests():
        probe.reset()
        forks, merges, open_before = stats["forks"], stats["merges"], bool(sched.trees.forks)
        t0 = time.perf_counter_ns()
        engine.step()
        wall = time.perf_counter_ns() - t0
        if probe.seqs == 0:
            continue
        if probe.prefill:
            kind = "prefill"
        elif stats["merges"] > merges:
            kind = "merge"
        elif last == "merge":
            kind = "after merge"
        elif stats["forks"] > forks:
            kind = "fork"
        elif last == "fork":
            kind = "after fork"
        else:
            kind = "inside" if open_before else "outside"
        steps.append({"kind": kind, "wall_ms": wall / 1e6, "sched_ms": probe.cpu_ns / 1e6, "seqs": probe.seqs})
        last = kind
    del sched.schedule, sched.update_from_output
    return steps


def table(steps: list[dict]) -> list[str]:
    plain = defaultdict(list)
    for s in steps:
        if s["kind"] == "outside":
            plain[s["seqs"]].append(s["wall_ms"])
    sizes = sorted(plain)

    def baseline(seqs: int) -> float | None:
        if not sizes:
            return None
        i = bisect.bisect_left(sizes, seqs)
        near = min(sizes[max(0, i - 1) : i + 1], key=lambda n: abs(n - seqs))
        return statistics.median(plain[near])

    rows = []
    for kind in KINDS:
        got = [s for s in steps if s["kind"] == kind]
        if not got:
            continue
        extra = [s["wall_ms"] - b for s in got if (b := baseline(s["seqs"])) is not None]
        rows.append(
            f"| {kind} | {len(got)} | {statistics.median(s['seqs'] for s in got):.0f} | "
            f"{statistics.median(s['wall_ms'] for s in got):.2f} | "
            f"{statistics.median(s['sched_ms'] for s in got):.2f} | "
            + (f"{statistics.median(extra):+.2f} |" if extra and kind != "prefill" else "- |")
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompts", type=int, default=4, help="batch-1 runs, one prompt each")
    args = ap.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from tiny_model.train import chat_prompt, held_out_tasks
    from vllm_multiverse.vllm032.plugin import register

    register()
    llm = LLM(model=str(TINY), dtype="float32", enforce_eager=True, max_model_len=2048,
              kv_cache_memory_bytes=1 << 30, seed=0)
    tok = AutoTokenizer.from_pretrained(TINY)
    prompts = [tok.encode(chat_prompt(tok, t.prompt()), add_special_tokens=False)
               for t in held_out_tasks(200) if t.parallel]
    params = SamplingParams(temperature=0.0, max_tokens=1500, skip_special_tokens=False)
    run_batch(llm, prompts[:1], params)  # warm-up
    print("| batch | kind | steps | sequences (median) | wall ms (median) | scheduler CPU ms "
          "| extra wall ms vs outside |")
    print("|---|---|---|---|---|---|---|")
    for b in args.batches:
        if b == 1:
            steps = [s for p in prompts[: args.prompts] for s in run_batch(llm, [p], params)]
        else:
            steps = run_batch(llm, prompts[:b], params)
        for row in table(steps):
            print(f"| {b} " + row)
    llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
