"""The main job (`make demo`): the bundled tiny Multiverse model answers a few
held-out prompts through the reference decoder (sequential Multiverse
decoding), with each answer's parallel structure drawn as a tree.

The vLLM engine (fork/merge) is not built yet; this shows the model and the
ground truth it will be held to.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from vllm_multiverse.structure import EventKind, analyze

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "multiverse-tiny"


def draw_tree(token_ids, prompt_len: int, tokens, tok) -> str:
    """One line per block and Path of the output, indented by depth."""
    s = analyze(token_ids, tokens)
    lines = []
    forks = {e.block: e for e in s.events if e.kind is EventKind.FORK and e.index >= prompt_len}
    for blk, ev in forks.items():
        pad = "  " * (ev.depth - 1)
        lines.append(f"{pad}Parallel block ({len(ev.branch_headers)} Paths)")
        for sp in (sp for sp in s.spans if sp.block == blk):
            text = tok.decode(token_ids[sp.start : sp.end], skip_special_tokens=True).strip()
            first = text.splitlines()[0] if text else ""
            lines.append(f"{pad}  +- Path {first!r}: {sp.end - sp.start} tokens")
    return "\n".join(lines) if lines else "(no Parallel block: a plain answer)"


def main() -> int:
    if not (MODEL_DIR / "model.safetensors").exists():
        print(f"The bundled model is missing: {MODEL_DIR}. Train it with `make model`.")
        return 1
    import torch
    from transformers import AutoTokenizer

    from vllm_multiverse.reference import ReferenceDecoder
    from vllm_multiverse.training.evaluate import critical_path
    from vllm_multiverse.training.tasks import extract_answer
    from vllm_multiverse.training.train import chat_prompt, held_out_tasks

    torch.set_num_threads(2)
    print(f"Loading {MODEL_DIR} ...", flush=True)
    dec = ReferenceDecoder.from_pretrained(MODEL_DIR)
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    tasks = held_out_tasks(200)
    picks = [next(t for t in tasks if not t.parallel), tasks[0], next(t for t in tasks if len(t.rounds) > 1)]
    picks.append(next(t for t in tasks if t.split is not None))
    for task in picks:
        prompt = task.prompt()
        ids = tok.encode(chat_prompt(tok, prompt), add_special_tokens=False)
        t0 = time.perf_counter()
        out = dec.generate(ids, max_tokens=2048)
        dt = time.perf_counter() - t0
        text = tok.decode(out.token_ids, skip_special_tokens=False)
        answer = extract_answer(text)
        crit = critical_path(ids + out.token_ids, len(ids), dec.tokens)
        print("\n" + "=" * 72)
        print(f"Prompt: {prompt}")
        print(draw_tree(ids + out.token_ids, len(ids), dec.tokens, tok))
        mark = "right" if answer == task.answer() else f"wrong, expected {task.answer()}"
        print(f"Answer: {answer}  ({mark})")
        print(
            f"{len(out.token_ids)} tokens ({sum(out.written)} written by the engine) in {dt:.1f} s; "
            f"critical path {crit} tokens: ideal parallel speedup {len(out.token_ids) / crit:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
