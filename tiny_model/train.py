"""Train the tiny Multiverse model from scratch, with Multiverse attention.

    python -m tiny_model.train --out models/multiverse-tiny

Deterministic for a given seed and thread count: the data, the
initialisation and the batch order all come from the seed. The test set
(`tasks.stratified_test_set`) is never trained on (`TaskSampler` skips it). The mask and the
position ids of every example come from the structure module, the same code
the engine and the reference decoder use.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

from tiny_model.tasks import (
    Task,
    TaskSampler,
    held_out_tasks,  # noqa: F401  (the engine tests and benchmarks take it from here)
)
from tiny_model.tokenizer import IM_END, build_tokenizer
from vllm_multiverse.model_config import declaration, write_multiverse_config
from vllm_multiverse.structure import MultiverseTokens, analyze

# token ids, and the ids to learn: -100 where no loss (the prompt, a moved Path's start)
Example = tuple[list[int], list[int]]


@dataclass
class TrainConfig:
    seed: int = 3
    steps: int = 3000
    batch_size: int = 8  # rows per step
    row_tokens: int = 1088  # examples are packed into rows of at most this many tokens
    lr: float = 3e-3
    warmup: int = 400
    weight_decay: float = 0.01
    hidden_size: int = 128
    layers: int = 4
    heads: int = 2  # head_dim 64: vLLM's CPU attention supports it
    intermediate_size: int = 512
    max_positions: int = 2048
    threads: int = 1  # the shipped seeds: one thread each, two side by side
    checkpoint_every: int = 0  # also save the model to OUT/checkpoint every this many steps (0: never)
    moved: float = 0.4  # share of Paths started elsewhere (TaskSampler) at the last step
    # The share at step 0; it goes linearly to `moved`. Few moved Paths while
    # the model learns to read S, many while the learning rate falls and
    # copying the Paths is learnt.
    moved_from: float = 0.1
    # Some initialisations never learn to copy S from the prompt into the
    # Paths (seed 1 with 80 warm-up steps, in three recipes); the others
    # have by step 900. At `gate_step` a run stops when more than `gate_max`
    # of the Path starts of the first test prompts are wrong, instead of
    # training on for an hour.
    gate_step: int = 900
    gate_max: float = 0.2


def encode_example(tok, tokens: MultiverseTokens, task: Task) -> Example:
    """Chat-templated prompt + completion + EOS, and the labels: the
    completion's tokens, except the changed start number of each moved Path
    (`Task.moved`), which the prompt does not give. The rest of such a Path
    (additions from that number) is right and is learnt."""
    p = tok.encode(chat_prompt(tok, task.prompt()), add_special_tokens=False)
    c = tok.encode(task.completion(), add_special_tokens=False) + [tok.convert_tokens_to_ids(IM_END)]
    ids = p + c
    labels = [-100] * len(p) + c
    for label, _ in task.moved:
        for i in moved_start(tok, tokens, ids, label):
            labels[i] = -100
    return ids, labels


def path_span(tok, tokens: MultiverseTokens, ids: list[int], label: str):
    """The span (structure rule) of the Path labelled `label`."""
    s = analyze(ids, tokens)
    head = tok.encode(f"<Path>\n{label}:\n", add_special_tokens=False)
    return next(sp for sp in s.spans if ids[sp.start : sp.start + len(head)] == head)


def moved_start(tok, tokens: MultiverseTokens, ids: list[int], label: str) -> range:
    """Token indices of the number a Path's first addition starts from."""
    head = tok.encode(f"<Path>\n{label}:\n", add_special_tokens=False)
    first = path_span(tok, tokens, ids, label).start + len(head)
    return range(first, ids.index(tok.convert_tokens_to_ids("+"), first))


def chat_prompt(tok, user_text: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": user_text}], add_generation_prompt=True, tokenize=False)


class RowPacker:
    """Fills `rows` rows of at most `row_tokens` tokens with examples, first
    fit in arrival order; an example that fits nowhere waits for the next
    batch. Padding to the longest example wasted a quarter of each step."""

    def __init__(self, rows: int, row_tokens: int) -> None:
        self.rows, self.row_tokens = rows, row_tokens
        self.waiting: list[Example] = []
        self.filler: Example | None = None

    def batch(self, next_example: Callable[[], Example]) -> list[list[Example]]:
        rows: list[list[Example]] = []
        used: list[int] = []
        while True:
            ex = self.waiting.pop() if self.waiting else next_example()
            if len(ex[0]) > self.row_tokens:
                raise ValueError(f"an example of {len(ex[0])} tokens does not fit a row of {self.row_tokens}")
            free = next((i for i, u in enumerate(used) if u + len(ex[0]) <= self.row_tokens), None)
            if free is not None:
                rows[free].append(ex)
                used[free] += len(ex[0])
            elif len(rows) < self.rows:
                rows.append([ex])
                used.append(len(ex[0]))
            else:
                self.waiting.append(ex)
                return rows

    def fill(self, rows: list[list[Example]], next_filler: Callable[[], Example]) -> int:
        """Packs short examples into what each row leaves free up to the
        longest row: the batch is that long anyway, so they cost no compute.
        Returns how many went in; the first that does not fit waits."""
        n = max(sum(len(ids) for ids, _ in row) for row in rows)
        added = 0
        for row in rows:
            used = sum(len(ids) for ids, _ in row)
            while True:
                self.filler = self.filler or next_filler()
                if used + len(self.filler[0]) > n:
                    break
                row.append(self.filler)
                used += len(self.filler[0])
                self.filler = None
                added += 1
        return added


def collate(rows, tokens: MultiverseTokens, pad_id: int):
    """input_ids, labels (the examples' own: assistant tokens only), position ids, 4-D masks.

    Each row holds one or more examples side by side: each keeps its own
    positions and Multiverse mask, and sees nothing of the others."""
    n = max(sum(len(ids) for ids, _ in row) for row in rows)
    b = len(rows)
    input_ids = torch.full((b, n), pad_id, dtype=torch.long)
    labels = torch.full((b, n), -100, dtype=torch.long)
    positions = torch.zeros((b, n), dtype=torch.long)
    allowed = torch.zeros((b, 1, n, n), dtype=torch.bool)
    for r, row in enumerate(rows):
        o = 0
        for ids, learn in row:
            s = analyze(ids, tokens)
            e = o + len(ids)
            input_ids[r, o:e] = torch.tensor(ids)
            labels[r, o:e] = torch.tensor(learn)
            positions[r, o:e] = torch.from_numpy(s.positions)
            allowed[r, 0, o:e, o:e] = torch.from_numpy(s.dense_mask())
            o = e
        # Padding attends to itself only, so no row of the mask is all -inf.
        allowed[r, 0, o:, o:] = torch.eye(n - o, dtype=torch.bool)
    mask = torch.zeros(allowed.shape, dtype=torch.float32)
    mask.masked_fill_(~allowed, torch.finfo(torch.float32).min)
    return input_ids, labels, positions, mask


def build_model(cfg: TrainConfig, tok) -> Qwen2ForCausalLM:
    vocab = 8 * math.ceil(len(tok) / 8)
    mcfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.max_positions,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.convert_tokens_to_ids(IM_END),
        pad_token_id=tok.pad_token_id,
        dtype="float32",
    )
    return Qwen2ForCausalLM(mcfg)


def train(cfg: TrainConfig, out: Path, log_every: int = 50) -> dict:
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    tok = build_tokenizer()
    tokens = MultiverseTokens.from_tokenizer(tok)
    model = build_model(cfg, tok)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    sampler = TaskSampler(cfg.seed, cfg.moved_from)
    counts = {"examples": 0, "moved": 0, "plain": 0}

    def next_example() -> Example:
        task = sampler.sample()
        counts["examples"] += 1
        counts["moved"] += len(task.moved)
        return encode_example(tok, tokens, task)

    def next_plain() -> Example:
        return encode_example(tok, tokens, sampler.sample_plain())

    packer = RowPacker(cfg.batch_size, cfg.row_tokens)
    t0, cpu0 = time.time(), time.process_time()
    history, gate = [], None
    for step in range(cfg.steps):
        sampler.moved = cfg.moved_from + (cfg.moved - cfg.moved_from) * step / max(1, cfg.steps - 1)
        rows = packer.batch(next_example)
        counts["plain"] += packer.fill(rows, next_plain)
        input_ids, labels, positions, mask = collate(rows, tokens, tok.pad_token_id)
        loss = model(input_ids=input_ids, labels=labels, position_ids=positions, attention_mask=mask).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == cfg.steps - 1:
            history.append((step, round(loss.item(), 4)))
            print(f"step {step:5d} loss {loss.item():.4f} {time.time() - t0:7.1f}s", flush=True)
        if step + 1 == cfg.gate_step:
            gate = read_s_gate(model, tok, tokens, out / "checkpoint", cfg)
            model.train()
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            # To measure a long run while it trains; the next save overwrites it.
            save(model, tok, tokens, out / "checkpoint")
    model.eval()
    save(model, tok, tokens, out)
    meta = {
        "train_config": asdict(cfg),
        "train_seconds": round(time.time() - t0, 1),
        # CPU seconds of this process (both threads): the wall time grows
        # when the machine is shared, this does not.
        "train_cpu_seconds": round(time.process_time() - cpu0, 1),
        "examples": counts["examples"] + counts["plain"],
        "plain_fillers": counts["plain"],
        "moved_paths": counts["moved"],
        "gate": gate,
        "loss": history,
    }
    (out / "training.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


class SeedMissedS(RuntimeError):
    pass


def read_s_gate(model, tok, tokens: MultiverseTokens, where: Path, cfg: TrainConfig, prompts: int = 30) -> dict:
    """Teacher-forces the first `prompts` parallel test prompts on the model
    as it is, and stops the run (`SeedMissedS`) when it has not learnt to
    read S."""
    from tiny_model.evaluate import Evaluator
    from tiny_model.tasks import stratified_test_set

    model.eval()
    save(model, tok, tokens, where)
    tasks = [t for t in stratified_test_set() if t.parallel][:prompts]
    with torch.random.fork_rng():  # loading a model draws its initialisation: the run must not see that
        ev = Evaluator(where)
        wrong, total = ev.misread_starts(tasks)
    gate = {"step": cfg.gate_step, "path_starts": total, "wrong": wrong}
    print(f"gate at step {cfg.gate_step}: {wrong} of {total} Path starts wrong", flush=True)
    if wrong > cfg.gate_max * total:
        raise SeedMissedS(
            f"seed {cfg.seed} has not learnt to read S by step {cfg.gate_step}: {wrong} of {total} Path starts "
            f"of the first {prompts} parallel test prompts are wrong (more than {cfg.gate_max:.0%}); "
            "train another seed (--seed)"
        )
    return gate


def save(model, tok, tokens: MultiverseTokens, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    eos = [tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids("<|endoftext|>")]
    GenerationConfig(eos_token_id=eos, pad_token_id=tok.pad_token_id, do_sample=False).save_pretrained(out)
    # Trained with the training positions (train.py builds them with the structure rule's default).
    write_multiverse_config(out, declaration(tokens, "training"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("models/multiverse-tiny"))
    for field, default in asdict(TrainConfig()).items():
        ap.add_argument(f"--{field.replace('_', '-')}", type=type(default), default=default)
    args = ap.parse_args()
    cfg = TrainConfig(**{f: getattr(args, f) for f in asdict(TrainConfig())})
    try:
        train(cfg, args.out)
    except SeedMissedS as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
