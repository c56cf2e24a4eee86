"""Measure the tiny Multiverse model three ways, none drawn from its training mix.

    python -m tiny_model.evaluate models/multiverse-tiny --out eval.json --card

1. The fixed test set (`tasks.stratified_test_set`: every kind and N, 14
   start numbers each, never trained on), generated greedily with the
   reference decoder. Per prompt: is the whole completion the task's, is
   the answer line right, is the structure the one the task calls for (a
   block per round, a nested block for a split, the Outline, Path and
   Conclusion labels of the task), and the ideal speedup of the output.
2. The sweep: every prompt of the task (`tasks.all_tasks`) teacher-forced
   with its right completion. The first token where the model's argmax
   differs is where greedy decoding leaves the right completion, so no
   difference means greedy decoding writes exactly that completion; the
   prompts that differ are then generated for their answers. Exact up to
   ties between logits.
3. The Reduce check: in each parallel test prompt, each Path that does
   additions in turn is started at another number (`Task.moved`) and the
   completion teacher-forced: every Conclusion line and the answer must
   follow it. Reported beside it, strict: everything the model writes
   after that number must follow (that Path's own additions from a start
   it rarely sees, a split Path's sum of its halves).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from tiny_model.tasks import ANSWER_CUE, Task, all_tasks, extract_answer, kinds, stratified_test_set
from tiny_model.train import chat_prompt, moved_start
from vllm_multiverse.reference import ReferenceDecoder
from vllm_multiverse.structure import EventKind, StructureConfig, analyze

MAX_TOKENS = 2048
PERTURB_SEED = 20_000  # the moved Paths' start numbers


@dataclass
class PromptResult:
    prompt: str
    kind: str
    parallel: bool
    well_formed: bool  # the blocks, Outlines, Paths and Conclusion lines the task calls for
    exact: bool  # the whole completion is the task's
    correct: bool  # the answer line is the task's
    output_tokens: int
    critical_path: int

    @property
    def ideal_speedup(self) -> float:
        return self.output_tokens / max(1, self.critical_path)


def critical_path(token_ids, prompt_len: int, tokens) -> int:
    """Decode steps on the critical path of the output: with the engine's
    positions every Path of a block starts at one position and the
    Conclusion follows the longest, so the positions count exactly that."""
    pos = analyze(token_ids, tokens, StructureConfig(positions="engine")).positions
    return int(pos[-1] - pos[prompt_len - 1])


_GOAL = re.compile(r"<Goal>\n(.*?)</Goal>", re.DOTALL)
_CONCLUSION = re.compile(r"<Conclusion>\n(.*?)</Conclusion>", re.DOTALL)
_OUTLINE_LABEL = re.compile(r"<Outline>\n([0-9.]+):")
_PATH_LABEL = re.compile(r"<Path>\n([0-9.]+):")
_LINE_LABEL = re.compile(r"^#([0-9.]+)=", re.MULTILINE)


def layout(text: str) -> tuple:
    """The labels of every Goal's Outlines, of the Paths and of every
    Conclusion's lines, in text order."""
    return (
        [_OUTLINE_LABEL.findall(g) for g in _GOAL.findall(text)],
        _PATH_LABEL.findall(text),
        [_LINE_LABEL.findall(c) for c in _CONCLUSION.findall(text)],
    )


def judge(task: Task, prompt_ids, out_ids, tokens, tok) -> PromptResult:
    seq = list(prompt_ids) + list(out_ids)
    s = analyze(seq, tokens)
    forks = [e.depth for e in s.events if e.kind is EventKind.FORK and e.index >= len(prompt_ids)]
    concls = sum(e.kind is EventKind.CONCLUSION and e.index >= len(prompt_ids) for e in s.events)
    text = tok.decode(out_ids, skip_special_tokens=False)
    gold = task.completion()
    # The blocks the task calls for (one per round, one nested block in the
    # split Path), and in them its labels: a block that counts right but
    # holds a Path too many or too few is not.
    well = (
        s.well_formed
        and len(forks) == concls
        and forks.count(1) == (len(task.rounds) if task.parallel else 0)
        and forks.count(2) == (task.split is not None)
        and max(forks, default=0) <= 2
        and layout(text) == layout(gold)
    )
    gold_ids = tok.encode(gold, add_special_tokens=False) + [tok.eos_token_id]
    return PromptResult(
        prompt=task.prompt(),
        kind=task.kind,
        parallel=task.parallel,
        well_formed=well,
        exact=list(out_ids) == gold_ids,
        correct=extract_answer(text) == task.answer(),
        output_tokens=len(out_ids),
        critical_path=critical_path(seq, len(prompt_ids), tokens),
    )


class Evaluator:
    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        self.dec = ReferenceDecoder.from_pretrained(model_dir)
        self.tok = AutoTokenizer.from_pretrained(model_dir)

    def encode(self, task: Task) -> tuple[list[int], int]:
        """The task's prompt and right completion (EOS included), and the prompt's length."""
        p = self.tok.encode(chat_prompt(self.tok, task.prompt()), add_special_tokens=False)
        c = self.tok.encode(task.completion(), add_special_tokens=False) + [self.tok.eos_token_id]
        return p + c, len(p)

    def generate(self, task: Task) -> PromptResult:
        prompt_ids = self.tok.encode(chat_prompt(self.tok, task.prompt()), add_special_tokens=False)
        out = self.dec.generate(prompt_ids, max_tokens=MAX_TOKENS)
        return judge(task, prompt_ids, out.token_ids, self.dec.tokens, self.tok)

    @torch.no_grad()
    def forced_misses(self, ids: list[int], prompt_len: int, skip: range = range(0)) -> list[int]:
        """Indices of the completion's tokens the model would not write next
        (argmax) with the right text before them: engine-written tokens and
        `skip` aside."""
        s = analyze(ids, self.dec.tokens, self.dec.config)
        written = {e.index + 1 + j for e in s.events for j in range(len(e.write))}
        pred = self.dec.forward_logits(ids).argmax(-1).tolist()
        return [i for i in range(prompt_len, len(ids)) if pred[i - 1] != ids[i] and i not in written and i not in skip]

    def sweep_one(self, task: Task) -> dict:
        ids, plen = self.encode(task)
        if not self.forced_misses(ids, plen):
            return {"prompt": task.prompt(), "kind": task.kind, "exact": True, "correct": True}
        r = self.generate(task)
        return {"prompt": task.prompt(), "kind": task.kind, "exact": r.exact, "correct": r.correct}

    def perturbed(self, task: Task, label: str, start: int) -> tuple[bool, bool]:
        """When the Path `label` starts at `start`: do the Conclusions and the
        answer follow (the Reduce), and does everything the model writes
        after that number follow (strict: that Path's own additions from an
        unusual start and a split Path's sum of its halves too)?"""
        moved = replace(task, moved=((label, start),))
        ids, plen = self.encode(moved)
        misses = self.forced_misses(ids, plen, skip=moved_start(self.tok, self.dec.tokens, ids, label))
        reduce = self.reduce_tokens(ids, plen)
        return not any(i in reduce for i in misses), not misses

    def misread_starts(self, tasks: Iterable[Task]) -> tuple[int, int]:
        """Of the tasks' Paths that start at S, how many the model starts
        wrong (teacher-forced), and how many there are."""
        wrong = total = 0
        for task in tasks:
            ids, plen = self.encode(task)
            misses = set(self.forced_misses(ids, plen))
            for label in task.leaf_labels():
                if task.path_start(label) == task.start:
                    total += 1
                    wrong += any(i in misses for i in moved_start(self.tok, self.dec.tokens, ids, label))
        return wrong, total

    def reduce_tokens(self, ids: list[int], prompt_len: int) -> set[int]:
        """Indices of what the Reduce writes: every Conclusion's lines and the answer."""
        t, out, depth = self.dec.tokens, set(), 0
        answer = self.tok.convert_tokens_to_ids(ANSWER_CUE)
        for i in range(prompt_len, len(ids)):
            if ids[i] == t.conclusion_close:
                depth -= 1
            if depth > 0:
                out.add(i)
            if ids[i] == t.conclusion_open:
                depth += 1
            if ids[i] == answer:
                out.update(range(i + 1, len(ids)))
                break
        return out


def moves(tasks: Iterable[Task], seed: int = PERTURB_SEED) -> list[tuple[Task, str, int]]:
    """Every Path that does additions, of every parallel task, each with
    another start number from 10 to 99."""
    rng = random.Random(seed)
    out = []
    for task in tasks:
        if task.parallel:
            for label in task.leaf_labels():
                start = rng.choice([s for s in range(10, 100) if s != task.path_start(label)])
                out.append((task, label, start))
    return out


def _rate(flags: list[bool]) -> float | None:
    return float(np.mean(flags)) if flags else None


def per_kind(rows: list[dict], fields: tuple[str, ...]) -> dict:
    by = defaultdict(list)
    for r in rows:
        by[r["kind"]].append(r)
    return {k: {"n": len(by[k]), **{f: _rate([r[f] for r in by[k]]) for f in fields}} for k in kinds() if by[k]}


def evaluate(model_dir: Path, sweep: bool = True, threads: int = 2, log=print) -> dict:
    torch.set_num_threads(threads)
    ev = Evaluator(model_dir)
    out: dict = {"training": json.loads((model_dir / "training.json").read_text())}
    t0 = time.time()
    results = [ev.generate(t) for t in stratified_test_set()]
    rows = [asdict(r) for r in results]
    par = [r for r in results if r.parallel]
    out["test"] = {
        "prompts": len(results),
        "exact": _rate([r.exact for r in results]),
        "correct": _rate([r.correct for r in results]),
        "well_formed": _rate([r.well_formed for r in results]),
        "ideal_speedup_mean_parallel": _rate([r.ideal_speedup for r in par]),
        "ideal_speedup_mean": _rate([r.ideal_speedup for r in results]),
        "output_tokens_mean": _rate([r.output_tokens for r in results]),
        "per_kind": per_kind(rows, ("exact", "correct", "well_formed")),
        "seconds": round(time.time() - t0, 1),
    }
    out["test_results"] = rows
    log(f"test set: {out['test']['exact']:.1%} exact, {out['test']['seconds']} s")
    t0 = time.time()
    checks = moves(stratified_test_set())
    follows = []
    for t, lab, s in checks:
        reduce, strict = ev.perturbed(t, lab, s)
        follows.append(
            {"prompt": t.prompt(), "kind": t.kind, "label": lab, "start": s, "follows": reduce, "strict": strict}
        )
    out["perturbation"] = {
        "checks": len(follows),
        "follows": _rate([f["follows"] for f in follows]),
        "strict": _rate([f["strict"] for f in follows]),
        "per_kind": per_kind(follows, ("follows", "strict")),
        "misses": [f for f in follows if not f["strict"]],
        "seconds": round(time.time() - t0, 1),
    }
    log(
        f"perturbation: {out['perturbation']['follows']:.1%} follow ({out['perturbation']['strict']:.1%} strict), "
        f"{out['perturbation']['seconds']} s"
    )
    if sweep:
        t0 = time.time()
        swept = [ev.sweep_one(t) for t in all_tasks()]
        out["sweep"] = {
            "prompts": len(swept),
            "exact": _rate([r["exact"] for r in swept]),
            "correct": _rate([r["correct"] for r in swept]),
            "per_kind": per_kind(swept, ("exact", "correct")),
            "misses": [r for r in swept if not r["exact"]],
            "seconds": round(time.time() - t0, 1),
        }
        log(f"sweep: {out['sweep']['exact']:.1%} exact, {out['sweep']['seconds']} s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--out", type=Path, help="write everything measured here (JSON)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the whole-space sweep")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--card", action="store_true", help="write the model card (README.md) into model_dir")
    ap.add_argument("--seeds", type=Path, nargs="+", help="eval.json of every seed of the recipe, for the card")
    ap.add_argument("--seeds-note", default="", help="which seed ships, and why (the card's words)")
    args = ap.parse_args()
    out = evaluate(args.model_dir, sweep=not args.no_sweep, threads=args.threads)
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    if args.card:
        from tiny_model.card import write_card

        runs = [json.loads(p.read_text()) for p in args.seeds] if args.seeds else None
        write_card(args.model_dir, out, runs, args.seeds_note)


if __name__ == "__main__":
    main()
