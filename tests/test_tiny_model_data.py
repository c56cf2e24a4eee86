"""The synthetic task, its test set, the tokenizer and the trainer of the tiny model."""

import re
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch

from tiny_model.tasks import (
    PLAIN_KS,
    STARTS,
    TEST_PER_KIND,
    Task,
    TaskSampler,
    all_tasks,
    extract_answer,
    held_out_tasks,
    kinds,
    make_task,
    stratified_test_set,
)
from tiny_model.tokenizer import build_tokenizer
from tiny_model.train import (
    RowPacker,
    SeedMissedS,
    TrainConfig,
    build_model,
    chat_prompt,
    collate,
    encode_example,
    moved_start,
    read_s_gate,
)
from vllm_multiverse.structure import EventKind, MultiverseTokens, StructureConfig, analyze

TOK = build_tokenizer()
TOKENS = MultiverseTokens.from_tokenizer(TOK)
_SAMPLER = TaskSampler(123)
TASKS = [_SAMPLER.sample() for _ in range(300)]


def prompt_len(task: Task) -> int:
    return len(TOK.encode(chat_prompt(TOK, task.prompt()), add_special_tokens=False))


def test_tags_are_single_special_tokens_and_text_round_trips():
    text = "<Think>\nLet's think in parallel.\n<Parallel>\n<Goal>\n<Outline>\n1:\n</Outline>\n"
    ids = TOK.encode(text, add_special_tokens=False)
    assert TOK.decode(ids) == text
    tag_ids = (TOKENS.parallel_open, TOKENS.goal_close, TOKENS.path_close)
    for tag, tid in zip(("<Parallel>", "</Goal>", "</Path>"), tag_ids):
        assert TOK.encode(tag, add_special_tokens=False) == [tid]
        assert tag in TOK.all_special_tokens
    assert TOK.decode(ids, skip_special_tokens=True).count("<") == 0
    assert TOKENS.path_header((TOK.convert_tokens_to_ids("7"), TOK.convert_tokens_to_ids(":"))) == tuple(
        TOK.encode("\n<Path>\n7:", add_special_tokens=False)
    )
    prompt = TOK.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_gold_completions_have_the_multiverse_structure():
    seen = Counter()
    for task in TASKS + stratified_test_set():
        ids, _ = encode_example(TOK, TOKENS, task)
        plen = prompt_len(task)
        s = analyze(ids, TOKENS)
        assert s.well_formed
        forks = [e for e in s.events if e.kind is EventKind.FORK]
        assert extract_answer(TOK.decode(ids[plen:])) == task.answer()
        seen[task.kind.split()[0]] += 1
        if not task.parallel:
            assert not forks
            continue
        # One Path per Outline, and the Path texts begin with the engine's headers.
        for ev in forks:
            for header in ev.branch_headers:
                assert any(ids[i : i + len(header)] == list(header) for i in range(ev.index + 1, len(ids)))
        top = [e for e in forks if e.depth == 1]
        assert len(top) == len(task.rounds)
        assert [len(e.branch_headers) for e in top] == [len(r) for r in task.rounds]
        assert sum(e.depth == 2 for e in forks) == (task.split is not None)
        leaf = [sp for sp in s.spans if not any(o.start > sp.start and o.end <= sp.end for o in s.spans)]
        # A sub-task: what the model writes in its Path (no header, no closing tag and tail).
        for sp in leaf:
            body = ids[sp.start : sp.end]
            header_end = body.index(TOK.convert_tokens_to_ids(":")) + 1
            assert 20 <= len(body) - header_end - 2 <= 80
    assert set(seen) == {"plain", "block", "split", "rounds"}


def conclusion_lines(text: str) -> dict[str, str]:
    blocks = re.findall(r"<Conclusion>\n(.*?)</Conclusion>", text, re.DOTALL)
    return dict(line.removeprefix("#").split("=") for c in blocks for line in c.split())


def test_conclusion_copies_each_path_and_a_moved_path_changes_it():
    task = make_task("split 4", 23)
    text = task.completion()
    # Each result follows its label's mark, one token found once per Path.
    ids = TOK.encode(text, add_special_tokens=False)
    for label in ("1", "1.1", "4"):
        mark = TOK.encode(f"#{label}=", add_special_tokens=False)
        assert len(mark) == 1 and ids.count(mark[0]) == 2  # the Path's last line, the Conclusion's
    # Each Path's last line, and each Conclusion line, as label -> value.
    last = dict(re.findall(r"\n#([0-9.]+)=([0-9]+)\n</Path>", text))
    concl = conclusion_lines(text)
    assert concl == last and set(last) == {"1", "1.1", "1.2", "2", "3", "4"}
    assert task.answer() == " ".join(str(23 + 7 * k) for k in range(1, 5))
    for label, start in (("3", 40), ("1.2", 10), ("1.1", 90)):
        moved = replace(task, moved=((label, start),))
        mtext = moved.completion()
        mlast = dict(re.findall(r"\n#([0-9.]+)=([0-9]+)\n</Path>", mtext))
        # The moved Path's own working starts there and adds its k.
        path = re.search(rf"<Path>\n{re.escape(label)}:\n([0-9]+)\+", mtext)
        assert path and int(path.group(1)) == start
        changed = {lab for lab in last if mlast[lab] != last[lab]}
        assert label in changed and changed <= {label, "1"}  # a nested Path changes Path 1's sum
        assert conclusion_lines(mtext) == mlast
        assert extract_answer(mtext) == moved.answer() == " ".join(mlast[str(k)] for k in moved.ks)
        assert moved.prompt() == task.prompt()


def test_only_a_moved_paths_start_number_carries_no_loss():
    task = replace(make_task("block 5", 61), moved=(("4", 12), ("2", 95)))
    ids, learn = encode_example(TOK, TOKENS, task)
    plen = prompt_len(task)
    text = TOK.decode(ids)
    assert "<Path>\n4:\n12+4=16\n" in text and "<Path>\n2:\n95+2=97\n" in text
    # The prompt, and the two digits of each changed start ("12", "95").
    no_loss = [i for i, lab in enumerate(learn) if lab == -100]
    starts = sorted(j for lab in ("2", "4") for j in moved_start(TOK, TOKENS, ids, lab))
    assert no_loss == list(range(plen)) + starts
    assert [TOK.decode(ids[i : i + 2]) for i in starts[::2]] == ["95", "12"]
    learnt = [t for i, t in enumerate(ids) if i >= plen and i not in starts]
    assert [lab for lab in learn[plen:] if lab != -100] == learnt


def test_test_set_is_stratified_and_never_trained_on():
    test = stratified_test_set()
    by_kind = Counter(t.kind for t in test)
    assert by_kind == {k: TEST_PER_KIND for k in kinds()}
    assert len({t.prompt() for t in test}) == len(test)
    for kind in kinds():
        starts = [t.start for t in test if t.kind == kind]
        assert {s // 10 for s in starts} == {s // 10 for s in STARTS}
    assert {t.ks[0] for t in test if t.kind == "plain"} == set(PLAIN_KS)
    # Any prefix the engine tests take mixes the kinds.
    assert {t.kind for t in held_out_tasks(len(kinds()))} == set(kinds())
    assert held_out_tasks(20) == test[:20] and held_out_tasks(10_000) == test
    # The whole space holds every prompt once; training draws none of the test set.
    space = {t.prompt() for t in all_tasks()}
    assert len(space) == len(all_tasks()) == len(STARTS) * (len(PLAIN_KS) + len(kinds()) - 1)
    assert {t.prompt() for t in test} <= space
    sampler = TaskSampler(0)
    drawn = [sampler.sample() for _ in range(30_000)] + [sampler.sample_plain() for _ in range(10_000)]
    assert not {t.prompt() for t in drawn} & {t.prompt() for t in test}
    assert {t.prompt() for t in drawn} | {t.prompt() for t in test} == space


def test_training_mix_covers_every_kind_and_moves_every_kind_of_path():
    sampler = TaskSampler(0)
    drawn = [sampler.sample() for _ in range(4000)]
    share = Counter(t.kind for t in drawn)
    assert set(share) == set(kinds()) - {"plain"}
    assert min(share.values()) / len(drawn) >= 0.05
    leaves = sum(len(t.leaf_labels()) for t in drawn)
    moves = [(t, label, start) for t in drawn for label, start in t.moved]
    assert abs(len(moves) / leaves - sampler.moved) < 0.03
    # Most examples hold a moved Path, so a Conclusion recomputed as a
    # progression is wrong in most of them and only copying is always right.
    assert sum(bool(t.moved) for t in drawn) / len(drawn) >= 0.75
    assert {label for _, label, _ in moves} >= {"1.1", "1.2", "1", "8"}
    assert all(start != replace(t, moved=()).path_start(label) for t, label, start in moves)


def test_gold_outputs_are_worth_parallelising():
    speedups = []
    for task in stratified_test_set():
        if task.parallel:
            ids, _ = encode_example(TOK, TOKENS, task)
            plen = prompt_len(task)
            pos = analyze(ids, TOKENS, StructureConfig(positions="engine")).positions
            speedups.append((len(ids) - plen) / (pos[-1] - pos[plen - 1]))
    assert np.mean(speedups) >= 2.5


def test_collate_uses_the_structure_rule():
    batch = [encode_example(TOK, TOKENS, t) for t in TASKS[:3]]
    _, labels, positions, mask = collate([[ex] for ex in batch], TOKENS, TOK.pad_token_id)
    for r, (ids, learn) in enumerate(batch):
        s = analyze(ids, TOKENS)
        n = len(ids)
        assert positions[r, :n].tolist() == s.positions.tolist()
        assert torch.equal(mask[r, 0, :n, :n] == 0, torch.from_numpy(s.dense_mask()))
        assert labels[r, :n].tolist() == learn
        assert (labels[r, n:] == -100).all()


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


def test_padding_is_filled_with_plain_examples_up_to_the_longest_row():
    sampler = TaskSampler(5)
    plain = [encode_example(TOK, TOKENS, sampler.sample_plain()) for _ in range(200)]
    fillers = iter(plain)
    examples = iter([encode_example(TOK, TOKENS, t) for t in TASKS])
    packer = RowPacker(rows=4, row_tokens=1088)
    rows = packer.batch(lambda: next(examples))
    counts = [len(row) for row in rows]
    before = [sum(len(ids) for ids, _ in row) for row in rows]
    added = packer.fill(rows, lambda: next(fillers))
    after = [sum(len(ids) for ids, _ in row) for row in rows]
    # The batch stays as long as its longest row: no compute added.
    assert added > 0 and max(after) == max(before)
    # The fillers go in, in order, after each row's own examples; the first
    # that fits nowhere waits for the next batch.
    put = [ids for row, c in zip(rows, counts) for ids, _ in row[c:]]
    assert put == [ids for ids, _ in plain[:added]]
    assert packer.filler[0] == plain[added][0]
    assert after[-1] + len(packer.filler[0]) > max(before)


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


def test_the_gate_stops_a_run_that_has_not_learnt_to_read_s(tmp_path):
    # An untrained model starts no Path at S: the gate must stop the run
    # with the reason and the remedy, not train on.
    torch.manual_seed(0)
    cfg = TrainConfig(layers=1, seed=7)
    model = build_model(cfg, TOK)
    before = torch.get_rng_state()
    reason = r"seed 7 has not learnt to read S by step 900: \d+ of \d+ Path starts.*--seed"
    with pytest.raises(SeedMissedS, match=reason):
        read_s_gate(model, TOK, TOKENS, tmp_path / "gate", cfg, prompts=2)
    assert torch.equal(torch.get_rng_state(), before)  # the run goes on as if the gate had not looked


def test_judge_asks_for_the_structure_and_the_labels_the_task_calls_for():
    from tiny_model.evaluate import judge

    def verdict(task, written: str):
        plen = prompt_len(task)
        ids, _ = encode_example(TOK, TOKENS, task)
        out = TOK.encode(written, add_special_tokens=False) + [TOK.eos_token_id]
        return judge(task, ids[:plen], out, TOKENS, TOK)

    for task in stratified_test_set()[:40]:
        r = verdict(task, task.completion())
        assert r.well_formed and r.correct and r.exact, task.prompt()
    split = make_task("split 5", 40)
    unnested = verdict(split, replace(split, split=None).completion())
    assert not unnested.well_formed and not unnested.exact
    rounds = make_task("rounds 3+3", 40)
    one_block = verdict(rounds, replace(rounds, rounds=(rounds.ks,)).completion())
    assert one_block.correct and not one_block.well_formed
    # A Path too many (with its Outline), and the answer of the task still right.
    block = make_task("block 6", 40)
    extra = block.completion().replace("</Goal>", "<Outline>\n7:\n</Outline>\n</Goal>", 1)
    path7 = make_task("block 7", 40).completion()
    path7 = path7[path7.index("<Path>\n7:") : path7.index("<Conclusion>")]
    extra = extra.replace("<Conclusion>", path7 + "<Conclusion>")
    r = verdict(block, extra)
    assert r.correct and not r.well_formed and not r.exact
    # A Conclusion line short.
    short = block.completion().replace(f"6={block.result(6)}\n</Conclusion>", "</Conclusion>")
    assert not verdict(block, short).well_formed
    # Right answer, wrong working: not exact.
    wrong = block.completion().replace(f"{block.start}+3=", f"{block.start + 1}+3=", 1)
    r = verdict(block, wrong)
    assert r.correct and r.well_formed and not r.exact
