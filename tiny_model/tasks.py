"""A synthetic MapReduce task that makes parallel decoding worth it.

"Start at S and add k seven times, for k = 1 to N.": sub-task k is S + 7k,
written out as seven additions (55 to 76 tokens), so a Goal gets one Outline
per k, one Path per Outline, and a Conclusion that collects the Path results
into the final, exactly checkable answer:

- one k ("Start at 23 and add 4 seven times."): a plain answer, no Parallel
  block (the sequential path);
- k = 1 to N, N from 2 to 8: one Parallel block;
- "for k = 1 to 3, then k = 4 to 6": two blocks of equal size one after the
  other (labels continue across rounds);
- "Split k = 1 in halves.": Path 1 holds a nested block, "1.1:" adding 1
  four times to S and "1.2:" adding 1 three times to 0, and adds the halves.
  Always k = 1: when any k could be split, the Path had to compare its own
  label with the one in the prompt, and the model opened the nested block
  with probability 1/N in every Path (5 of 41 split prompts nested).

Seven additions, not eight: S runs to 99 (see TaskSampler), so sums reach
three digits, and eight three-digit additions made a Path 86 tokens long,
past the 80 a sub-task may take.

Why this task: a Path knows which sub-task is its own only from the label
the engine wrote into its header (Paths share positions). Sub-tasks whose
data sit in the prompt under their label ("1: 3 5 9 | 2: ...") need the
model to find its group by label; models this small trained for 30 minutes
did not learn that (0% exact answers, twice). Here the label is the data:
Path k adds k, and the only other input, S, is shared by every Path.

The texts follow the authors' serialisation (research notes, section 1.1):
every tag on its own line, "Let's think in parallel." before each block,
numeric labels, and the Path texts begin exactly with the headers the engine
writes ("\\n<Path>\\n{label}:"). Every Path ends with "{label}={result}", so
the Conclusion can find each result by its label; the answer lists the
results in label order.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

PARALLEL_CUE = "Let's think in parallel."
ANSWER_CUE = "Answer:"
REPEATS = 7  # additions per sub-task
REPEATS_WORD = "seven"
HALVES = (4, 3)  # additions per nested Path of a split sub-task


@dataclass(frozen=True)
class Task:
    start: int
    rounds: tuple[tuple[int, ...], ...]  # the values of k, block by block
    split: int | None = None  # the k whose Path holds a nested block

    @property
    def ks(self) -> tuple[int, ...]:
        return tuple(k for r in self.rounds for k in r)

    @property
    def parallel(self) -> bool:
        return len(self.ks) > 1

    def result(self, k: int) -> int:
        return self.start + REPEATS * k

    def prompt(self) -> str:
        if not self.parallel:
            return f"Start at {self.start} and add {self.ks[0]} {REPEATS_WORD} times."
        ranges = ", then ".join(f"k = {r[0]} to {r[-1]}" for r in self.rounds)
        text = f"Start at {self.start} and add k {REPEATS_WORD} times, for {ranges}."
        if self.split is not None:
            text += f" Split k = {self.split} in halves."
        return text

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
            work = self._split_work(k) if k == self.split else _steps(self.start, k, REPEATS)
            out.append(f"<Path>\n{k}:\n{work}{k}={self.result(k)}\n</Path>\n")
        out.append(_conclusion({str(k): self.result(k) for k in ks}))
        return "".join(out)

    def _split_work(self, k: int) -> str:
        (n1, n2), a, b = HALVES, f"{k}.1", f"{k}.2"
        r1, r2 = self.start + n1 * k, n2 * k
        return (
            _goal([a, b])
            + f"<Path>\n{a}:\n{_steps(self.start, k, n1)}{a}={r1}\n</Path>\n"
            + f"<Path>\n{b}:\n{_steps(0, k, n2)}{b}={r2}\n</Path>\n"
            + _conclusion({a: r1, b: r2})
            + f"{r1}+{r2}={r1 + r2}\n"
        )


def _goal(labels: list[str]) -> str:
    outlines = "".join(f"<Outline>\n{label}:\n</Outline>\n" for label in labels)
    return f"{PARALLEL_CUE}\n<Parallel>\n<Goal>\n{outlines}</Goal>\n"


def _conclusion(results: dict[str, int]) -> str:
    text = " ".join(f"{label}={value}" for label, value in results.items())
    return f"<Conclusion>\n{text}\n</Conclusion>\n</Parallel>\n"


def _steps(acc: int, k: int, n: int) -> str:
    lines = []
    for _ in range(n):
        lines.append(f"{acc}+{k}={acc + k}\n")
        acc += k
    return "".join(lines)


# Block sizes of two-round prompts: equal. The model does not read where
# the second range ends. With sizes 3 or 4 drawn apart (run E) its second
# Goals ended with the first one's count or at label 7, the commonest
# total; with sizes 3 to 5 (run F) they always ended at label 7 (16/42
# right). Equal blocks make the count the first Goal's.
_ROUNDS = [(3, 3), (4, 4)]


class TaskSampler:
    """Seeded task mix: 4% one k, 25% two rounds, 15% with a split sub-task.

    Two rounds got a quarter because their second Goal (labels 5 to 8) is
    the rarest count to end: at 15% it stopped early in 12 of 31 prompts.

    Most prompts have many sub-tasks, half of them eight: the sequential
    part (Outlines, Conclusion, answer) costs about 15 tokens per sub-task
    against a Path of about 65, so few sub-tasks would leave little to
    parallelise (gold outputs: 1.6 times faster at N = 2, 3.25 at N = 8).
    """

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def sample(self) -> Task:
        r = self.rng
        # S spans 90 values so that the 200 held-out prompts leave most
        # prompts of every kind to training: with 26 values they took 25 of
        # the 26 "k = 1 to 8" prompts, and the model did not learn where
        # that Conclusion ends.
        start = r.randint(10, 99)
        kind = r.random()
        if kind < 0.04:
            return Task(start, ((r.randint(1, 9),),))
        if kind < 0.29:
            a, b = r.choice(_ROUNDS)
            return Task(start, (tuple(range(1, a + 1)), tuple(range(a + 1, a + b + 1))))
        n = r.choice((2, 3, 4, 5, 6, 7, 7, 8, 8, 8, 8, 8, 8, 8))
        split = 1 if kind < 0.44 else None
        return Task(start, (tuple(range(1, n + 1)),), split)


_ANSWER_RE = re.compile(re.escape(ANSWER_CUE) + r" ?([0-9=. ]*)")


def extract_answer(text: str) -> str | None:
    """The text after "Answer:", or None when the model wrote no answer."""
    m = _ANSWER_RE.search(text)
    return m.group(1).strip() if m else None
