"""Calls between the Multiverse policy (``vllm_multiverse/tree/``) and the vLLM
layer (``vllm_multiverse/vllm032/``), either way, while the tiny model answers
one held-out prompt whose answer holds exactly one Parallel block (one fork
and its merge), greedy, engine core in this process.

    python benchmarks/layer_crossings.py [--paths 3]

Each call from one layer into the other is put in the phase of the vLLM
scheduler method it happens under (the names are vLLM's, so the count
compares across redesigns of either layer): per sampled token
(``_update_request_with_output``), per step (``schedule``, and
``update_from_output`` outside the fork's and the merge's steps), and the fork
and its merge (``update_from_output`` in the steps that fork, launch, end a
Path or merge, beyond the per-step calls of a plain step, and
``_free_request_blocks``). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tiny model's task (tiny_model/)
TINY = ROOT / "models" / "multiverse-tiny"
POLICY, VLLM_LAYER = "vllm_multiverse.tree", "vllm_multiverse.vllm032"
PHASES = ("_update_request_with_output", "_free_request_blocks", "schedule", "update_from_output", "add_request")


def _layer(frame) -> str | None:
    name = frame.f_globals.get("__name__", "")
    if name.startswith(POLICY):
        return "policy"
    if name.startswith(VLLM_LAYER):
        return "vllm"
    return None


class Crossings:
    """sys.setprofile hook: counts calls whose caller and callee sit in
    different layers, by the phase (vLLM scheduler method) they run under."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.step: Counter[str] = Counter()

    def __call__(self, frame, event, arg) -> None:
        if event != "call":
            return
        callee = _layer(frame)
        caller = _layer(frame.f_back) if frame.f_back is not None else None
        if callee is None or caller is None or callee == caller:
            return
        f = frame.f_back
        while f is not None and f.f_code.co_name not in PHASES:
            f = f.f_back
        phase = f.f_code.co_name if f is not None else "other"
        self.counts[phase] += 1
        self.step[phase] += 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--paths", type=int, default=3, help="Paths of the one Parallel block")
    args = ap.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from tiny_model.train import chat_prompt, held_out_tasks

    tok = AutoTokenizer.from_pretrained(TINY)
    llm = LLM(model=str(TINY), dtype="float32", enforce_eager=True, max_model_len=2048,
              kv_cache_memory_bytes=512 * 2**20, seed=0)  # fmt: skip
    engine = llm.llm_engine
    sp = SamplingParams(temperature=0, max_tokens=1024, skip_special_tokens=False)
    parallel = tok.convert_tokens_to_ids("<Parallel>")
    outline = tok.convert_tokens_to_ids("<Outline>")
    for task in held_out_tasks(200):
        ids = tok.encode(chat_prompt(tok, task.prompt()), add_special_tokens=False)
        out = llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)[0].outputs[0].token_ids
        if list(out).count(parallel) == 1 and list(out).count(outline) == args.paths:
            break
    else:
        raise SystemExit(f"no held-out answer with one block of {args.paths} Paths")
    probe = Crossings()
    per_step: list[Counter[str]] = []
    engine.add_request("probe", {"prompt_token_ids": ids}, sp)
    sys.setprofile(probe)
    try:
        while engine.has_unfinished_requests():
            probe.step = Counter()
            engine.step()
            per_step.append(probe.step)
    finally:
        sys.setprofile(None)
    tokens = len(out)
    # A plain step while the fork is open (the commonest count): what the fork,
    # its launches, its Paths' ends and its merge add is the excess over it.
    baseline = statistics.mode(s["update_from_output"] for s in per_step)
    fork_and_merge = sum(s["update_from_output"] - baseline for s in per_step if s["update_from_output"] > baseline)
    fork_and_merge += probe.counts["_free_request_blocks"]
    print(json.dumps({
        "paths": args.paths, "output_tokens": tokens, "steps": len(per_step),
        "per_sampled_token": round(probe.counts["_update_request_with_output"] / tokens, 2),
        "per_step_schedule": round(probe.counts["schedule"] / len(per_step), 2),
        "per_step_update": baseline,
        "fork_and_merge": int(fork_and_merge),
        "all": dict(probe.counts),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
