"""The demo's drawing of an answer's structure: nested blocks under the Path
that holds them, and the degree of parallelism (output tokens over
critical-path tokens), on hand-written toy sequences."""

from toy_vocab import ID_TO_WORD, TOKENS, ids

from tiny_model.demo import draw_tree, parallelism


class ToyTok:
    def decode(self, token_ids, skip_special_tokens=True):
        words = [ID_TO_WORD[i] for i in token_ids]
        return " ".join(w for w in words if not (skip_special_tokens and w.startswith("<")))


def block(paths: list[list[str]], labels) -> str:
    goal = " ".join(f"<Outline> {lab} </Outline>" for lab in labels)
    body = " ".join(f"<Path> NL {lab} : {' '.join(p)} </Path> NL" for lab, p in zip(labels, paths))
    return f"<Parallel> NL <Goal> NL {goal} </Goal> NL {body} <Conclusion> NL c </Conclusion> NL </Parallel>"


INNER = block([["b"], ["b", "b", "b"]], ["o1", "o2"])
NESTED = ids("x y " + block([["a", "a", INNER], ["c", "c"]], ["o1", "o2"]) + " z")


def test_nested_block_is_drawn_under_its_path():
    lines = draw_tree(NESTED, 0, TOKENS, ToyTok()).splitlines()
    assert lines[0] == "Parallel block (2 Paths)"
    assert lines[1].startswith("+- Path 'o1")
    assert lines[2] == "|  Parallel block (2 Paths)"
    assert lines[3].startswith("|  +- Path 'o1") and lines[4].startswith("|  `- Path 'o2")
    assert lines[5].startswith("`- Path 'o2")
    assert len(lines) == 6
    assert draw_tree(ids("x y z"), 0, TOKENS, ToyTok()) == "(no Parallel block: a plain answer)"


def test_degree_of_parallelism_counts_the_longest_path():
    # Sequentially every token is a step; in parallel the Paths of a block
    # overlap and only the longest counts: tokens before the block, the
    # Goal, max(Path lengths) and what follows. Counted by hand from the
    # text: one Path length per block replaces the sum of them.
    flat = ids("x y " + block([["a", "a"], ["c", "c", "c", "c"]], ["o1", "o2"]) + " z")
    path1 = len(ids("<Path> NL o1 : a a </Path> NL"))
    path2 = len(ids("<Path> NL o2 : c c c c </Path> NL"))
    critical = len(flat) - path1 - path2 + max(path1, path2)
    assert parallelism(flat, TOKENS) == len(flat) / critical
    assert parallelism(ids("x y z"), TOKENS) == 1.0
    # Nested: Path o1's own critical path replaces its length.
    inner1, inner2 = len(ids("<Path> NL o1 : b </Path> NL")), len(ids("<Path> NL o2 : b b b </Path> NL"))
    inner = ids(block([["b"], ["b", "b", "b"]], ["o1", "o2"]))
    outer1 = len(ids("<Path> NL o1 : a a </Path> NL")) + len(inner)
    outer1_critical = outer1 - inner1 - inner2 + max(inner1, inner2)
    outer2 = len(ids("<Path> NL o2 : c c </Path> NL"))
    critical = len(NESTED) - outer1 - outer2 + max(outer1_critical, outer2)
    assert parallelism(NESTED, TOKENS) == len(NESTED) / critical


def test_make_demo_runs_end_to_end():
    """The README's first command: the demo starts `vllm serve` on the
    bundled model, asks each demo prompt in parallel and in sequential mode,
    and prints each answer's check. Run as a user runs it (its own process,
    its own server)."""
    import subprocess
    import sys

    from tiny_model.demo import DEMO_TASKS

    run = subprocess.run([sys.executable, "-m", "tiny_model.demo"], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    prompts = [line for line in run.stdout.splitlines() if line.startswith("Prompt: ")]
    assert prompts == [f"Prompt: {t.prompt()}" for t in DEMO_TASKS]
    answers = [line for line in run.stdout.splitlines() if line.startswith("Answer: ")]
    assert answers == [f"Answer: {t.answer()}  (right)" for t in DEMO_TASKS], run.stdout[-3000:]
    assert run.stdout.count("(same tokens)") == len(DEMO_TASKS)
