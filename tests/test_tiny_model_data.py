"""The synthetic task, the tokenizer and the trainer of the tiny model."""

import numpy as np
import torch

from vllm_multiverse.structure import EventKind, MultiverseTokens, StructureConfig, analyze
from vllm_multiverse.training.tasks import TaskSampler, extract_answer
from vllm_multiverse.training.tokenizer import build_tokenizer
from vllm_multiverse.training.train import TrainConfig, build_model, collate, encode_example

TOK = build_tokenizer()
TOKENS = MultiverseTokens.from_tokenizer(TOK)
_SAMPLER = TaskSampler(123)
TASKS = [_SAMPLER.sample() for _ in range(300)]


def test_tags_are_single_special_tokens_and_text_round_trips():
    text = "<Think>\nLet's think in parallel.\n<Parallel>\n<Goal>\n<Outline>\n1:\n</Outline>\n"
    ids = TOK.encode(text, add_special_tokens=False)
    assert TOK.decode(ids) == text
    for tag, tid in zip(("<Parallel>", "</Goal>", "</Path>"), (TOKENS.parallel_open, TOKENS.goal_close, TOKENS.path_close)):
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
    input_ids, labels, positions, mask = collate(batch, TOKENS, TOK.pad_token_id)
    for r, (ids, plen) in enumerate(batch):
        s = analyze(ids, TOKENS)
        n = len(ids)
        assert positions[r, :n].tolist() == s.positions.tolist()
        assert torch.equal(mask[r, 0, :n, :n] == 0, torch.from_numpy(s.dense_mask()))
        assert (labels[r, :plen] == -100).all() and labels[r, plen:n].tolist() == ids[plen:]


def test_training_is_deterministic_and_learns():
    from vllm_multiverse.training.train import TrainConfig, train  # noqa: F401

    def run():
        torch.manual_seed(0)
        cfg = TrainConfig(steps=3, batch_size=2, layers=1)
        model = build_model(cfg, TOK)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        batch = [encode_example(TOK, TOKENS, t) for t in TASKS[:2]]
        input_ids, labels, positions, mask = collate(batch, TOKENS, TOK.pad_token_id)
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
