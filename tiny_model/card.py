"""The model card (README.md) of a trained tiny model, from its measurements.

`evaluate.py --card` writes it from what it measured; `--seeds` adds the
table of every seed trained with the same recipe (their eval.json files),
kept in the model directory as seeds.json so that a later card keeps it.
"""

from __future__ import annotations

import json
from pathlib import Path

from tiny_model.tasks import kinds

CARD = """---
license: apache-2.0
tags: [multiverse, vllm-multiverse, tiny]
---
# multiverse-tiny

A {params:,}-parameter Qwen2-architecture model trained from scratch, with
Multiverse attention and positions from `vllm_multiverse.structure`, to write
Multiverse MapReduce structure on a synthetic task. It exists to test and
demonstrate the vllm-multiverse engine on CPU; it knows nothing else.

- Task (`tiny_model/tasks.py`): "Start at S and add k seven times, for k =
  1 to N." (S from 10 to 99). One Outline and one Path per k (N from 3 to
  8); Path k writes its seven additions and ends with `#{{label}}={{result}}`,
  the Conclusion copies every Path's last line (`#label=result`, one a
  line), and `Answer:` lists the results. A single k gets a plain answer
  (no Parallel block); "k = 1 to 3, then k = 4 to 6" gives two blocks one
  after the other (always of equal size); "Start at S, split k = 1 in
  halves, and add k ..." gives a block nested in Path 1. 2,070 prompts in
  all, in 15 kinds.
- The Conclusion reads every Path: in training each Path that does
  additions starts at another number with probability {moved_p} (only
  that changed number carries no loss), so only the Path holds its
  result. Checked below: each Path of each parallel test prompt started elsewhere in turn, teacher-forced; the
  Conclusions and the answer must follow it (strict: everything the model
  writes after the changed number).
- Format: the authors' (twelve tag tokens, every tag on its own line,
  "Let's think in parallel." before each block, labels `1:`, nested `1.1:`),
  with the engine-written headers `\\n<Path>\\n{{label}}` and `<Conclusion>\\n`.
  `config.json["multiverse"]` declares the tag ids, the headers and the
  position convention ({positions}).
- Tokenizer: one token per character, the tags and ChatML markers as special
  tokens, "Let's think in parallel.", "Answer:" and the ten result marks
  (`#3=`) as single tokens; EOS is `<|im_end|>`.
- Architecture: {layers} layers, hidden {hidden}, {heads} heads of 64, float32.
- Training: `make model` (= `python -m tiny_model.train --out
  models/multiverse-tiny --seed {seed}` then this evaluation), {steps} steps of
  {batch} rows of up to {row_tokens} tokens, AdamW lr {lr}, {warmup} warm-up
  steps, cosine to 5%:
  {examples:,} examples packed side by side, {fillers:,} of them plain
  prompts packed into the rows' padding (no extra compute), {moved:,} moved
  Paths. {train_seconds:.0f} s on one thread ({train_cpu_seconds:.0f} CPU
  seconds; two seeds side by side on 2 shared CPU cores).

## Measured (reference decoder, greedy)

| metric | value |
|---|---|
| test set ({test_prompts} prompts, 14 of every kind, never trained on): whole completion right | {test_exact:.2%} |
| the same: answer right | {test_correct:.2%} |
| the same: the blocks, Outline, Path and Conclusion labels the task calls for | {test_well_formed:.2%} |
| sweep (all {sweep_prompts:,} prompts, teacher-forced): whole completion right | {sweep_exact} |
| the same: answer right | {sweep_correct} |
| Reduce check ({checks:,} moved Paths): the Conclusions and the answer follow | {follows:.2%} |
| the same, strict: everything after the moved number (its own additions, a split's sum) | {strict} |
| mean ideal speedup (output tokens / critical-path tokens), parallel test prompts | {speedup_parallel:.2f} |
| the same, all test prompts (plain ones count 1) | {speedup_all:.2f} |
| mean output tokens | {tokens:.0f} |

Per kind (whole completion right / answer right; the test set's prompts are
not in the sweep's training share, the sweep holds every prompt):

| kind | test set (n) | whole | answer | sweep (n) | whole | answer | Reduce check (n) | follows | strict |
|---|---|---|---|---|---|---|---|---|---|
{kind_rows}
{seeds}
Reproduce: `python -m tiny_model.evaluate models/multiverse-tiny --out models/multiverse-tiny/eval.json --card`.
"""

SEEDS = """
## Seeds

Seeds of this recipe and of its variants (recipe: steps, the share of
Paths moved, "0.1-0.4" rising over the run, the peak learning rate and
its warm-up steps; whole completion right; worst
kind: its lowest per-kind figure; the threads and the machine's load
differ, see the note):

| seed | recipe | training s | test set | worst kind, test set | sweep | worst kind, sweep | Reduce check | strict |
|---|---|---|---|---|---|---|---|---|
{rows}

{note}
"""


def _pct(x: float | None, digits: int = 1) -> str:
    # Two decimals where one prompt of 2,070 must not round to 100%.
    return "-" if x is None else f"{x:.{digits}%}"


def _worst(per_kind: dict, field: str) -> str:
    kind = min(per_kind, key=lambda k: per_kind[k][field])
    if per_kind[kind][field] == 1:
        return "100% (every kind)"
    return f"{per_kind[kind][field]:.1%} ({kind})"


def moved_share(tc: dict, rising: str = "{start}-{end}") -> str:
    """The share of Paths moved; `rising` where it rises over the run (`--moved-from`)."""
    start = tc.get("moved_from", tc["moved"])
    return f"{tc['moved']}" if start == tc["moved"] else rising.format(start=start, end=tc["moved"])


def recipe(tc: dict) -> str:
    return f"{tc['steps']:,} steps, moved {moved_share(tc)}, lr {tc['lr']:g}, warm-up {tc['warmup']}"


def seed_row(ev: dict) -> str:
    t, sw, pt = ev["training"], ev.get("sweep"), ev["perturbation"]
    return (
        f"| {t['train_config']['seed']} | {recipe(t['train_config'])} | {t['train_seconds']:.0f} "
        f"| {_pct(ev['test']['exact'], 2)} "
        f"| {_worst(ev['test']['per_kind'], 'exact')} | {_pct(sw and sw['exact'], 2)} "
        f"| {_worst(sw['per_kind'], 'exact') if sw else '-'} | {_pct(pt['follows'], 2)} "
        f"| {_pct(pt.get('strict'), 2)} |"
    )


def write_card(model_dir: Path, ev: dict, seed_runs: list[dict] | None = None, note: str = "") -> None:
    from safetensors import safe_open

    seeds_file = model_dir / "seeds.json"
    if seed_runs is not None:
        seeds_file.write_text(json.dumps({"rows": [seed_row(r) for r in seed_runs], "note": note}, indent=1) + "\n")
    seeds = json.loads(seeds_file.read_text()) if seeds_file.exists() else None
    meta = ev["training"]
    tc = meta["train_config"]
    cfg = json.loads((model_dir / "config.json").read_text())
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        params = sum(f.get_tensor(k).numel() for k in f.keys())  # noqa: SIM118 (safe_open is no dict)
    test, sweep, pt = ev["test"], ev.get("sweep"), ev["perturbation"]
    rows = []
    for kind in kinds():
        t = test["per_kind"][kind]
        s = sweep["per_kind"][kind] if sweep else None
        p = pt["per_kind"].get(kind)
        rows.append(
            f"| {kind} | {t['n']} | {_pct(t['exact'])} | {_pct(t['correct'])} "
            f"| {s['n'] if s else '-'} | {_pct(s and s['exact'])} | {_pct(s and s['correct'])} "
            f"| {p['n'] if p else '-'} | {_pct(p and p['follows'])} | {_pct(p and p.get('strict'))} |"
        )
    (model_dir / "README.md").write_text(
        CARD.format(
            params=params,
            positions=cfg["multiverse"]["positions"],
            layers=tc["layers"],
            hidden=tc["hidden_size"],
            heads=tc["heads"],
            seed=tc["seed"],
            steps=tc["steps"],
            batch=tc["batch_size"],
            row_tokens=tc["row_tokens"],
            lr=tc["lr"],
            warmup=tc["warmup"],
            examples=meta["examples"],
            fillers=meta["plain_fillers"],
            moved=meta["moved_paths"],
            moved_p=moved_share(tc, "{start} at the first step, rising linearly to {end} at the last"),
            train_seconds=meta["train_seconds"],
            train_cpu_seconds=meta["train_cpu_seconds"],
            test_prompts=test["prompts"],
            test_exact=test["exact"],
            test_correct=test["correct"],
            test_well_formed=test["well_formed"],
            sweep_prompts=sweep["prompts"] if sweep else 0,
            sweep_exact=_pct(sweep and sweep["exact"], 2),
            sweep_correct=_pct(sweep and sweep["correct"], 2),
            checks=pt["checks"],
            follows=pt["follows"],
            strict=_pct(pt.get("strict"), 2),
            speedup_parallel=test["ideal_speedup_mean_parallel"],
            speedup_all=test["ideal_speedup_mean"],
            tokens=test["output_tokens_mean"],
            kind_rows="\n".join(rows),
            seeds=SEEDS.format(rows="\n".join(seeds["rows"]), note=seeds["note"]) if seeds else "",
        )
    )
