"""The synthetic task, the tokenizer and the trainer of the tiny model."""

import numpy as np
import torch

from tiny_model.tasks import TaskSampler, extract_answer
from tiny_model.tokenizer import build_tokenizer
from tiny_model.train import RowPacker, TrainConfig, build_model, collate, encode_example
from vllm_multiverse.structure import EventKind, MultiverseTokens, StructureConfig, analyze

TOK = build_tokenizer()
TOKENS = MultiverseTokens.from_tokenizer(TOK)
_SAMPLER = TaskSampler(123)
TASKS = [_SAMPLER.sample() for _ in range(300)]


def test_tags_are_single_special_tokens_and_text_round_trips():
    text = "<Think>\nLet's think in parallel.\n<Parallel>\n<Goal>\n<Outline>\n1:\n</Outline>\n"
    ids = TOK.encode(text, add_special_tokens=False)
    assert TOK.decode(ids) == text
    tags = {"<Parallel>": TOKENS.parallel_open, "</Goal>": TOKENS.goal_close, "</Path>": TOKENS.path_close}
    for tag, tid in tags.items():
        assert TOK.encode(tag, add_special_tokens=False) == [tid]
        assert tag in TOK.all_special_tokens
    assert TOK.decode(ids, skip_special_tokens=True).count("<") == 0
    assert TOKENS.path_header((TOK.convert_tokens_to_ids("7"), TOK.convert_tokens_to_ids(":"))) == tuple(
        TOK.encode("\n<Path>\n7:", add_special_tokens=False)
    )
    prompt = TOK.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_gold_completions_have_the_multiverse_structure():
    kinds = {"plain": 0, "one block": 0, "back to back": 0, "nested": 0}
    for task in TASKS:
        ids, plen = encode_example(TOK, TOKENS, task)
        s = analyze(ids, TOKENS)
        assert s.well_formed
        forks = [e for e in s.events if e.kind is EventKind.FORK]
        assert extract_answer(TOK.decode(ids[plen:])) == task.answer()
        if not task.parallel:
            kinds["plain"] += 1
            assert not forks
            continue
        # One Path per Outline, and the Path texts begin with the engine's headers.
        for ev in forks:
            for header in ev.branch_headers:
                assert any(ids[i : i + len(header)] == list(header) for i in range(ev.index + 1, len(ids)))
        depths = {e.depth for e in forks}
        top = [e for e in forks if e.depth == 1]
        kinds["nested" if 2 in depths else "back to back" if len(top) == 2 else "one block"] += 1
        leaf = [sp for sp in s.spans if not any(o.start > sp.start and o.end <= sp.end for o in s.spans)]
        # A sub-task: what the model writes in its Path (no header, no closing tag and tail).
        for sp in leaf:
            body = ids[sp.start : sp.end]
            header_end = body.index(TOK.convert_tokens_to_ids(":")) + 1
            assert 20 <= len(body) - header_end - 2 <= 80
        assert 2 <= len(top[0].branch_headers) <= 8
    assert all(v >= 5 for v in kinds.values()), kinds


def test_gold_outputs_are_worth_parallelising():
    speedups = []
    for task in TASKS:
        ids, plen = encode_example(TOK, TOKENS, task)
        pos = analyze(ids, TOKENS, StructureConfig(positions="engine")).positions
        speedups.append((len(ids) - plen) / (pos[-1] - pos[plen - 1]))
    assert np.mean(speedups) >= 2.5


def test_collate_uses_the_structure_rule():
    batch = [encode_example(TOK, TOKENS, t) for t in TASKS[:3]]
    input_ids, labels, positions, mask = collate([[ex] for ex in batch], TOKENS, TOK.pad_token_id)
    for r, (ids, plen) in enumerate(batch):
        s = analyze(ids, TOKENS)
        n = len(ids)
        assert positions[r, :n].tolist() == s.positions.tolist()
        assert torch.equal(mask[r, 0, :n, :n] == 0, torch.from_numpy(s.dense_mask()))
        assert (labels[r, :plen] == -100).all() and labels[r, plen:n].tolist() == ids[plen:]


def test_packer_fills_rows_first_fit_and_keeps_every_example():
    examples = iter([encode_example(TOK, TOKENS, t) for t in TASKS])
    packer = RowPacker(rows=4, row_tokens=1024)
    seen, packed = [], 0
    for _ in range(5):
        rows = packer.batch(lambda: next(examples))
        assert len(rows) == 4
        assert all(sum(len(ids) for ids, _ in row) <= 1024 for row in rows)
        seen += [ids for row in rows for ids, _ in row]
        packed += sum(len(row) > 1 for row in rows)
    assert packed > 0
    # Nothing lost or repeated: what the rows hold plus the one waiting
    # example are exactly the first examples drawn.
    drawn = seen + [ids for ids, _ in packer.waiting]
    expected = [encode_example(TOK, TOKENS, t)[0] for t in TASKS[: len(drawn)]]
    assert sorted(map(tuple, drawn)) == sorted(map(tuple, expected))


def test_packed_examples_do_not_see_each_other():
    torch.manual_seed(0)
    model = build_model(TrainConfig(layers=2), TOK).eval()
    a, b = (encode_example(TOK, TOKENS, t) for t in TASKS[:2])

    def logits(rows):
        input_ids, _, positions, mask = collate(rows, TOKENS, TOK.pad_token_id)
        with torch.no_grad():
            return model(input_ids=input_ids, position_ids=positions, attention_mask=mask).logits

    packed = logits([[a, b]])[0]
    alone_a, alone_b = logits([[a]])[0], logits([[b]])[0]
    torch.testing.assert_close(packed[: len(a[0])], alone_a[: len(a[0])], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(packed[len(a[0]) : len(a[0]) + len(b[0])], alone_b[: len(b[0])], rtol=1e-4, atol=1e-4)


def test_training_is_deterministic_and_learns():
    from tiny_model.train import TrainConfig, train  # noqa: F401

    def run():
        torch.manual_seed(0)
        cfg = TrainConfig(steps=3, batch_size=2, layers=1)
        model = build_model(cfg, TOK)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        rows = [[encode_example(TOK, TOKENS, t)] for t in TASKS[:2]]
        input_ids, labels, positions, mask = collate(rows, TOKENS, TOK.pad_token_id)
        losses = []
        for _ in range(3):
            loss = model(input_ids=input_ids, labels=labels, position_ids=positions, attention_mask=mask).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, model.model.embed_tokens.weight.detach().clone()

    (l1, w1), (l2, w2) = run(), run()
    assert l1 == l2 and torch.equal(w1, w2)
    assert l1[-1] < l1[0]


def test_judge_asks_for_the_blocks_the_prompt_calls_for():
    from dataclasses import replace

    from tiny_model.evaluate import judge

    def verdict(task, written):
        ids, plen = encode_example(TOK, TOKENS, task)
        out = TOK.encode(written.completion(), add_special_tokens=False)
        return judge(task, ids[:plen], out, TOKENS, TOK)

    for task in TASKS[:40]:
        r = verdict(task, task)
        assert r.well_formed and r.correct, task.prompt()
    split = next(t for t in TASKS if t.split is not None)
    unnested = verdict(split, replace(split, split=None))
    assert unnested.correct and not unnested.well_formed
    rounds = next(t for t in TASKS if len(t.rounds) == 2)
    one_block = verdict(rounds, replace(rounds, rounds=(rounds.ks,)))
    assert one_block.correct and not one_block.well_formed
