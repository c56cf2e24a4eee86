"""A synthetic MapReduce task that makes parallel decoding worth it.

"Start at S and add k seven times, for k = 1 to N.": sub-task k is S + 7k,
written out as seven additions (55 to 76 tokens), so a Goal gets one Outline
per k, one Path per Outline, and a Conclusion that collects the Path results
into the final, exactly checkable answer:

- one k ("Start at 23 and add 4 seven times."): a plain answer, no Parallel
  block (the sequential path);
- k = 1 to N, N from 3 to 8: one Parallel block;
- "for k = 1 to 3, then k = 4 to 6": two blocks of equal size one after the
  other (labels continue across rounds);
- "Start at S, split k = 1 in halves, and add k seven times, for k = 1 to
  N.": Path 1 holds a nested block, "1.1:" adding 1 four times to S and
  "1.2:" adding 1 three times to 0, and adds the halves. Always k = 1: when
  any k could be split, the Path had to compare its own label with the one
  in the prompt, and the model opened the nested block with probability 1/N
  in every Path (5 of 41 split prompts nested). The range ends the prompt,
  as in every other kind: with the split sentence after it, the model could
  not tell N = 7 from N = 8 and wrote the commoner count.

Seven additions, not eight: S runs to 99, so sums reach three digits, and
eight three-digit additions made a Path 86 tokens long, past the 80 a
sub-task may take.

Why this task: a Path knows which sub-task is its own only from the label
the engine wrote into its header (Paths share positions). Sub-tasks whose
data sit in the prompt under their label ("1: 3 5 9 | 2: ...") need the
model to find its group by label; models this small trained for 30 minutes
did not learn that (0% exact answers, twice). Here the label is the data:
Path k adds k, and the only other input, S, is shared by every Path.

The Reduce is real: every Path ends with "#{label}={result}" on its own
line ("#3=" is one token, `tokenizer.RESULT_MARKS`) and the Conclusion
copies each result from there, one such line per Path, which the answer
lists in label order. Results that always
form a progression S + 7k let a model skip the Paths and recompute the
Conclusion from S (the first tiny model did: rewriting Path 3 changed
nothing after it), so training also shows Paths whose working begins
elsewhere (``Task.moved``): only the Paths hold those results.

The texts follow the authors' serialisation (research notes, section 1.1):
every tag on its own line, "Let's think in parallel." before each block,
numeric labels, and the Path texts begin exactly with the headers the engine
writes ("\\n<Path>\\n{label}:").
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

PARALLEL_CUE = "Let's think in parallel."
ANSWER_CUE = "Answer:"
REPEATS = 7  # additions per sub-task
REPEATS_WORD = "seven"
HALVES = (4, 3)  # additions per nested Path of a split sub-task
STARTS = range(10, 100)  # S
PLAIN_KS = range(1, 10)  # k of a plain prompt
# N of a one-block prompt, split or not. Not 2: two Paths gain 1.6 at
# most, and with every N as often as the others in the test set, N = 2
# took the held-out mean ideal speedup under 2.5 (2.44).
BLOCK_NS = range(3, 9)
# Block sizes of two-round prompts: equal. The model does not read where
# the second range ends. With sizes 3 or 4 drawn apart its second Goals
# ended with the first one's count or at label 7, the commonest total; with
# sizes 3 to 5 they always ended at label 7 (16/42 right). Equal blocks
# make the count the first Goal's.
ROUND_SIZES = (3, 4)


@dataclass(frozen=True)
class Task:
    start: int
    rounds: tuple[tuple[int, ...], ...]  # the values of k, block by block
    split: int | None = None  # the k whose Path holds a nested block
    # (label, start) pairs: those Paths' working begins at `start` instead,
    # so their results, the Conclusion and the answer change with them.
    # Training data (the changed start numbers carry no loss) and the
    # evaluation's check that the Conclusion reads every Path; the prompt
    # does not say it.
    moved: tuple[tuple[str, int], ...] = ()

    @property
    def ks(self) -> tuple[int, ...]:
        return tuple(k for r in self.rounds for k in r)

    @property
    def parallel(self) -> bool:
        return len(self.ks) > 1

    @property
    def kind(self) -> str:
        """The stratum: "plain", "block N", "split N" or "rounds A+B"."""
        if not self.parallel:
            return "plain"
        if len(self.rounds) > 1:
            return "rounds " + "+".join(str(len(r)) for r in self.rounds)
        return f"{'split' if self.split is not None else 'block'} {len(self.ks)}"

    def leaf_labels(self) -> list[str]:
        """Every Path that does its own additions: the Paths a move can start elsewhere."""
        return [lab for k in self.ks for lab in ([f"{k}.1", f"{k}.2"] if k == self.split else [str(k)])]

    def path_start(self, label: str) -> int:
        """Where the Path's additions begin: S, or 0 for a split's second half."""
        return dict(self.moved).get(label, 0 if label.endswith(".2") else self.start)

    def result(self, k: int) -> int:
        if k == self.split:
            (n1, n2), a, b = HALVES, f"{k}.1", f"{k}.2"
            return self.path_start(a) + n1 * k + self.path_start(b) + n2 * k
        return self.path_start(str(k)) + REPEATS * k

    def prompt(self) -> str:
        if not self.parallel:
            return f"Start at {self.start} and add {self.ks[0]} {REPEATS_WORD} times."
        ranges = ", then ".join(f"k = {r[0]} to {r[-1]}" for r in self.rounds)
        split = "" if self.split is None else f", split k = {self.split} in halves,"
        return f"Start at {self.start}{split} and add k {REPEATS_WORD} times, for {ranges}."

    def answer(self) -> str:
        return " ".join(str(self.result(k)) for k in self.ks)

    def completion(self) -> str:
        """The assistant's whole text, as the model is trained to write it."""
        if not self.parallel:
            body = _steps(self.start, self.ks[0], REPEATS)
        else:
            body = "".join(self._block(r) for r in self.rounds)
        return f"<Think>\n{body}</Think>\n\n{ANSWER_CUE} {self.answer()}"

    def _block(self, ks: tuple[int, ...]) -> str:
        out = [_goal([str(k) for k in ks])]
        for k in ks:
            work = self._split_work(k) if k == self.split else _steps(self.path_start(str(k)), k, REPEATS)
            out.append(_path(str(k), work, self.result(k)))
        out.append(_conclusion({str(k): self.result(k) for k in ks}))
        return "".join(out)

    def _split_work(self, k: int) -> str:
        (n1, n2), a, b = HALVES, f"{k}.1", f"{k}.2"
        s1, s2 = self.path_start(a), self.path_start(b)
        r1, r2 = s1 + n1 * k, s2 + n2 * k
        return (
            _goal([a, b])
            + _path(a, _steps(s1, k, n1), r1)
            + _path(b, _steps(s2, k, n2), r2)
            + _conclusion({a: r1, b: r2})
            + f"{r1}+{r2}={r1 + r2}\n"
        )


def _goal(labels: list[str]) -> str:
    outlines = "".join(f"<Outline>\n{label}:\n</Outline>\n" for label in labels)
    return f"{PARALLEL_CUE}\n<Parallel>\n<Goal>\n{outlines}</Goal>\n"


def result_mark(label: str) -> str:
    """What a Path's result follows, in its last line and in the Conclusion:
    one token per label (`tokenizer.RESULT_MARKS`)."""
    return f"#{label}="


def result_labels() -> list[str]:
    """Every label a result mark is made for: the Paths of every kind."""
    top = max(max(BLOCK_NS), 2 * max(ROUND_SIZES))
    return [str(k) for k in range(1, top + 1)] + ["1.1", "1.2"]


def _path(label: str, work: str, result: int) -> str:
    return f"<Path>\n{label}:\n{work}{result_mark(label)}{result}\n</Path>\n"


def _conclusion(results: dict[str, int]) -> str:
    # One line per Path, written as the Path's own last line. Its mark is
    # one token found once in the Paths, so the Conclusion's lookup is
    # "the number after this token": with "3=" spelt out, "+3=" in every
    # addition of Path 3 matched too, and the model recomputed the values
    # from S instead of copying them.
    lines = "".join(f"{result_mark(label)}{value}\n" for label, value in results.items())
    return f"<Conclusion>\n{lines}</Conclusion>\n</Parallel>\n"


def _steps(acc: int, k: int, n: int) -> str:
    lines = []
    for _ in range(n):
        lines.append(f"{acc}+{k}={acc + k}\n")
        acc += k
    return "".join(lines)


def kinds() -> list[str]:
    """Every stratum of the task, in a fixed order."""
    return (
        ["plain"]
        + [f"block {n}" for n in BLOCK_NS]
        + [f"split {n}" for n in BLOCK_NS]
        + [f"rounds {a}+{a}" for a in ROUND_SIZES]
    )


def make_task(kind: str, start: int, k: int = 1) -> Task:
    """The task of a stratum for S = `start` (`k`: a plain prompt's k)."""
    name, _, size = kind.partition(" ")
    if name == "plain":
        return Task(start, ((k,),))
    if name == "rounds":
        a = int(size.split("+")[0])
        return Task(start, (tuple(range(1, a + 1)), tuple(range(a + 1, 2 * a + 1))))
    return Task(start, (tuple(range(1, int(size) + 1)),), 1 if name == "split" else None)


def all_tasks() -> list[Task]:
    """The whole space of prompts (2,070), stratum by stratum."""
    out = [make_task("plain", s, k) for k in PLAIN_KS for s in STARTS]
    return out + [make_task(kind, s) for kind in kinds()[1:] for s in STARTS]


TEST_PER_KIND = 14


def stratified_test_set() -> list[Task]:
    """The fixed test set, by construction: every stratum, 14 start numbers
    evenly spread over 10-99 (each tens digit at least once), shifted by
    0-6 per stratum so that the units digits vary; plain prompts cycle
    through k. Stratum by stratum interleaved (each stratum's list rotated,
    so that the first round does not hold only the smallest S), so that
    any prefix holds every kind. Training never sees these prompts."""
    strata = []
    for c, kind in enumerate(kinds()):
        starts = [STARTS[(j * len(STARTS)) // TEST_PER_KIND + (5 * c) % 7] for j in range(TEST_PER_KIND)]
        tasks = [make_task(kind, s, 1 + j % len(PLAIN_KS)) for j, s in enumerate(starts)]
        turn = (3 * c) % TEST_PER_KIND
        strata.append(tasks[turn:] + tasks[:turn])
    return [strata[c][j] for j in range(TEST_PER_KIND) for c in _STRATUM_ORDER]


# Interleaving order of the strata: the first few test prompts (which the
# engine tests use) mix long and short blocks, a split and two rounds.
_STRATUM_ORDER = (6, 8, 14, 0, 2, 11, 13, 4, 7, 1, 10, 5, 9, 3, 12)


def held_out_tasks(n: int) -> list[Task]:
    """The first `n` test prompts (all of them when `n` is larger)."""
    return stratified_test_set()[:n]


class TaskSampler:
    """Seeded training mix over the parallel kinds: two rounds 20%, one block
    40% and a split block 40%, N uniform over 3-8 (every kind and N at least
    6% of the examples). Plain prompts are not drawn here: they fill the
    rows' padding (train.py, `RowPacker`), where they cost no compute.

    Each Path that does additions starts at another number from 10 to 99
    with probability `moved` (`Task.moved`), so that a Conclusion written as a
    progression from Path 1 or from S is wrong in most examples and only
    copying the Paths is right. At 0.25 an example has 1.6 moved Paths on
    average (18% have none), and every Path is moved as often as any other,
    the nested halves included. At 0.4 (with results marked "3=", three
    tokens) one seed of two never learnt to read S from the prompt; with
    one moved Path in a quarter of the examples, the model still wrote
    progressions after 700 steps. The test set's prompts are never drawn.
    """

    def __init__(self, seed: int, moved: float = 0.25) -> None:
        self.rng = random.Random(seed)
        self.moved = moved
        self.held_out = {t.prompt() for t in stratified_test_set()}

    def sample(self) -> Task:
        return self._fresh(self._draw)

    def sample_plain(self) -> Task:
        """A plain prompt, for the rows' padding."""
        return self._fresh(lambda: make_task("plain", self.rng.choice(STARTS), self.rng.choice(PLAIN_KS)))

    def _fresh(self, draw: Callable[[], Task]) -> Task:
        while (task := draw()).prompt() in self.held_out:
            pass
        return task

    def _draw(self) -> Task:
        r = self.rng
        start = r.choice(STARTS)
        kind = r.random()
        if kind < 0.2:
            a = r.choice(ROUND_SIZES)
            task = make_task(f"rounds {a}+{a}", start)
        else:
            task = make_task(f"{'split' if kind < 0.6 else 'block'} {r.choice(BLOCK_NS)}", start)
        moved = tuple(
            (label, r.choice([s for s in STARTS if s != task.path_start(label)]))
            for label in task.leaf_labels()
            if r.random() < self.moved
        )
        return Task(task.start, task.rounds, task.split, moved)


_ANSWER_RE = re.compile(re.escape(ANSWER_CUE) + r" ?([0-9=. ]*)")


def extract_answer(text: str) -> str | None:
    """The text after "Answer:", or None when the model wrote no answer."""
    m = _ANSWER_RE.search(text)
    return m.group(1).strip() if m else None
