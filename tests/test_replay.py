"""Transcript replay (``benchmarks/forcing.py``): a transcript that is
not the model's own output is reproduced token for token through the
parallel engine and sequential decoding, and the alignment of a request's
sequence (root, branch, nested branch) onto the transcript."""

from __future__ import annotations

import pytest
from conftest import TINY_MODEL


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_MODEL)


@pytest.fixture(scope="module")
def tags(tok):
    from forcing import Tags

    return Tags(*tok.convert_tokens_to_ids(["<Path>", "<Parallel>", "</Parallel>"]))


def _task(kind: str):
    """The shortest held-out task of a kind: a nested block, or two blocks."""
    from tiny_model.train import held_out_tasks

    if kind == "nested":
        tasks = [t for t in held_out_tasks(200) if t.split is not None]
    else:
        tasks = [t for t in held_out_tasks(200) if t.parallel and t.split is None and len(t.rounds) == 2]
    return min(tasks, key=lambda t: len(t.completion()))


def _edited(task, eos: str) -> str:
    """The task's reference answer with Path text and sequential text
    changed, the structure kept: no model writes it greedily."""
    text = task.completion()
    lines = text.split("\n")
    # A line of arithmetic inside each Path ("a+b=c") and the final answer.
    changed = [i for i, ln in enumerate(lines) if "+" in ln and "=" in ln]
    for i in changed[::3]:
        lines[i] = lines[i].replace("=", "=9", 1)
    out = "\n".join(lines).replace("Answer: ", "Answer: 7")
    assert out != text
    return out + eos


# -- alignment (plain Python) ----------------------------------------------

NESTED = (
    "<Think>\nx\n<Parallel>\n<Goal>\n<Outline>\n1:\n</Outline>\n<Outline>\n2:\n</Outline>\n</Goal>\n"
    "<Path>\n1:\nLet's think in parallel.\n<Parallel>\n<Goal>\n<Outline>\n1.1:\n</Outline>\n<Outline>\n1.2:\n"
    "</Outline>\n</Goal>\n<Path>\n1.1:\n1+1=2\n</Path>\n<Path>\n1.2:\n3+3=6\n</Path>\n<Conclusion>\n"
    "1.1=2 1.2=6\n</Conclusion>\n</Parallel>\n</Path>\n<Path>\n2:\n4+4=8\n</Path>\n<Conclusion>\n"
    "1=8 2=8\n</Conclusion>\n</Parallel>\n</Think>\n\nAnswer: 8<|im_end|>"
)


def _ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def _after(tok, text: str, anchor: str) -> int:
    """Index in the transcript's ids of the first token after ``anchor``."""
    return len(_ids(tok, text[: text.index(anchor) + len(anchor)]))


def test_root_is_the_transcript_itself(tok, tags):
    from forcing import Alignment

    answer = _ids(tok, NESTED)
    a = Alignment(answer, tags)
    out: list[int] = []
    for t in answer:
        assert a.target(out) == t
        out.append(t)
    assert a.target(out) is None  # past the end: nothing forced


def test_branch_skips_its_earlier_sibling_paths(tok, tags):
    from forcing import Alignment

    answer = _ids(tok, NESTED)
    goal = _ids(tok, NESTED[: NESTED.index("</Goal>") + len("</Goal>")])
    # Path 2's branch: the parent's text through </Goal>, then the header the engine writes.
    a = Alignment(answer, tags, goal + _ids(tok, "\n<Path>\n2:"))
    k = _after(tok, NESTED, "<Path>\n2:")
    assert a.target([]) == answer[k]
    assert tok.decode(answer[k : k + 6]) == "\n4+4=8"
    out = answer[k : k + 6]
    assert a.target(out) == answer[k + 6]
    assert tok.decode(answer[k + 6 : k + 8], skip_special_tokens=False) == "\n</Path>"


def test_nested_branch_skips_at_both_levels(tok, tags):
    from forcing import Alignment

    answer = _ids(tok, NESTED)
    # Branch 1 of the outer block forked again at the nested </Goal>: the
    # nested Path 1.2's branch.
    through_nested_goal = NESTED.index("</Goal>", NESTED.index("1.1:\n</Outline>")) + len("</Goal>")
    prefix = _ids(tok, NESTED[:through_nested_goal]) + _ids(tok, "\n<Path>\n1.2:")
    a = Alignment(answer, tags, prefix)
    k = _after(tok, NESTED, "<Path>\n1.2:")
    assert a.target([]) == answer[k]
    assert tok.decode(answer[k : k + 6]) == "\n3+3=6"


def test_forcing_stops_where_the_sequence_leaves_and_resumes_where_it_returns(tok, tags):
    from forcing import Alignment

    answer = _ids(tok, NESTED)
    a = Alignment(answer, tags)
    k = _after(tok, NESTED, "</Goal>")
    other = next(t for t in range(len(tok)) if t != answer[k] and t != tags.path_open)
    out = answer[:k] + [other]
    assert a.target(out) is None  # left the transcript outside a Path header
    out[-1] = answer[k]  # rewritten in place (vLLM's runner edits the list it holds)
    out += answer[k + 1 : k + 3]
    assert a.target(out) == answer[k + 3]


def test_an_unknown_path_is_not_forced(tok, tags):
    from forcing import Alignment

    answer = _ids(tok, NESTED)
    goal = _ids(tok, NESTED[: NESTED.index("</Goal>") + len("</Goal>")])
    assert Alignment(answer, tags, goal + _ids(tok, "\n<Path>\n3:")).target([]) is None


# -- through the engine -----------------------------------------------------


@pytest.fixture(scope="module")
def llm(engines, tiny_model_dir):
    from conftest import model_runner
    from forcing import ReplayLogitsProcessor, ReplayLogitsProcessorV2

    processor = ReplayLogitsProcessorV2 if model_runner() == "v2" else ReplayLogitsProcessor
    return engines.get(tiny_model_dir, logits_processors=[processor])


@pytest.mark.both_runners
def test_engine_reproduces_an_edited_transcript(llm):
    from forcing import replay_args
    from vllm import SamplingParams

    from tiny_model.train import chat_prompt

    tok = llm.get_tokenizer()
    prompts, params, want = [], [], []
    modes = {"nested": (({}, 0.0), ({"multiverse_sequential": True}, 0.0), ({}, 1.0)), "two blocks": (({}, 0.0),)}
    for kind, runs in modes.items():
        task = _task(kind)
        prompt = _ids(tok, chat_prompt(tok, task.prompt()))
        answer = _ids(tok, _edited(task, tok.eos_token))
        for extra, temperature in runs:
            prompts.append({"prompt_token_ids": prompt})
            params.append(SamplingParams(
                temperature=temperature, seed=3, max_tokens=len(answer), skip_special_tokens=False,
                extra_args={**replay_args(len(prompt), answer), **extra}))
            want.append(answer)
    # Without the processor's arguments the model writes its own answer.
    prompts.append(prompts[0])
    params.append(SamplingParams(temperature=0.0, max_tokens=len(want[0]), skip_special_tokens=False))
    outs = llm.generate(prompts, params, use_tqdm=False)
    got = [list(o.outputs[0].token_ids) for o in outs]
    assert got[:-1] == want
    assert got[-1] != want[0]
    stats = llm.llm_engine.engine_core.engine_core.scheduler.trees.stats
    assert stats["forks"] >= 6  # each parallel request forked at every block, nested ones included
