"""A synthetic MapReduce task that makes parallel decoding worth it.

The prompt lists numbered groups of distinct digits; the answer is the sum
of every group. Each group is an independent sub-task written out step by
step (20 to 80 tokens), so a Goal gets one Outline per group, one Path per
Outline, and a Conclusion that collects the Path results into the final,
exactly checkable answer:

- one group: a plain answer, no Parallel block (the sequential path);
- 2 to 8 groups: one Parallel block;
- two rounds of groups ("1: ... | 2: ... ; 3: ... | 4: ..."): two blocks one
  after the other (labels continue across rounds);
- a group split in parts ("1: 3 5 9 / 8 2 4"): that group's Path holds a
  nested block with one Path per part ("1.1:", "1.2:"), and adds their sums.

The texts follow the authors' serialisation (research notes, section 1.1):
every tag on its own line, "Let's think in parallel." before each block,
numeric labels, and the Path texts begin exactly with the headers the engine
writes ("\\n<Path>\\n{label}:"). Every Path ends with "{label}={sum}", so the
Conclusion (and the answer, which repeats it) can find each result by its
label: Paths share positions, only their content tells them apart.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

PARALLEL_CUE = "Let's think in parallel."
ANSWER_CUE = "Answer:"
INSTRUCTION = "Add up each group."


@dataclass(frozen=True)
class Group:
    label: str
    parts: tuple[tuple[int, ...], ...]  # one part, or several for a nested block

    @property
    def digits(self) -> tuple[int, ...]:
        return tuple(d for p in self.parts for d in p)

    @property
    def total(self) -> int:
        return sum(self.digits)

    def body(self) -> str:
        return " / ".join(" ".join(map(str, p)) for p in self.parts)


@dataclass(frozen=True)
class Task:
    rounds: tuple[tuple[Group, ...], ...]

    @property
    def groups(self) -> tuple[Group, ...]:
        return tuple(g for r in self.rounds for g in r)

    @property
    def parallel(self) -> bool:
        return len(self.groups) > 1

    def prompt(self) -> str:
        return f"{INSTRUCTION} " + " ; ".join(
            " | ".join(f"{g.label}: {g.body()}" for g in r) for r in self.rounds
        )

    def answer(self) -> str:
        return _results(self.groups)

    def completion(self) -> str:
        """The assistant's whole text, as the model is trained to write it."""
        if not self.parallel:
            (g,) = self.groups
            body = f"{g.body()}\n{_steps(g.digits)}"
        else:
            body = "".join(_block(r) for r in self.rounds)
        return f"<Think>\n{body}</Think>\n\n{ANSWER_CUE} {self.answer()}"


def _results(groups) -> str:
    return " ".join(f"{g.label}={g.total}" for g in groups)


def _steps(digits) -> str:
    lines, acc = [], digits[0]
    for d in digits[1:]:
        lines.append(f"{acc}+{d}={acc + d}")
        acc += d
    return "".join(line + "\n" for line in lines)


def _block(groups: tuple[Group, ...]) -> str:
    out = [f"{PARALLEL_CUE}\n<Parallel>\n<Goal>\n"]
    out += [f"<Outline>\n{g.label}:\n</Outline>\n" for g in groups]
    out.append("</Goal>\n")
    for g in groups:
        out.append(f"<Path>\n{g.label}: {g.body()}\n{_path_work(g)}{g.label}={g.total}\n</Path>\n")
    out.append(f"<Conclusion>\n{_results(groups)}\n</Conclusion>\n</Parallel>\n")
    return "".join(out)


def _path_work(g: Group) -> str:
    if len(g.parts) == 1:
        return _steps(g.digits)
    subs = tuple(Group(f"{g.label}.{k + 1}", (p,)) for k, p in enumerate(g.parts))
    return _block(subs) + _steps(tuple(s.total for s in subs))


class TaskSampler:
    """Seeded task mix: 4% one group, 15% two rounds, 15% with a nested group.

    Groups hold 6 to 8 distinct digits (Paths of about 50 to 80 tokens) and
    most prompts have many groups: the sequential part (Outlines, Conclusion,
    answer) costs about 17 tokens per group, so short Paths or few groups
    would leave little to parallelise.
    """

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def _group(self, label: str, nested: bool) -> Group:
        r = self.rng
        digits = r.sample(range(1, 10), r.randint(6, 8))
        if not nested:
            return Group(label, (tuple(digits),))
        cut = r.randint(3, len(digits) - 3)
        return Group(label, (tuple(digits[:cut]), tuple(digits[cut:])))

    def sample(self) -> Task:
        r = self.rng
        kind = r.random()
        if kind < 0.04:
            return Task(((self._group("1", False),),))
        if kind < 0.19:
            sizes = (r.randint(5, 6), r.randint(5, 6))
        else:
            sizes = (r.choice((2, 3, 4, 5, 6, 7, 7, 8, 8, 8, 8)),)
        nest_at = r.randrange(sizes[0]) if 0.19 <= kind < 0.34 else -1
        rounds, k = [], 0
        for n in sizes:
            groups = []
            for _ in range(n):
                groups.append(self._group(str(k + 1), nested=(k == nest_at)))
                k += 1
            rounds.append(tuple(groups))
        return Task(tuple(rounds))


_ANSWER_RE = re.compile(re.escape(ANSWER_CUE) + r" ?([0-9=. ]*)")


def extract_answer(text: str) -> str | None:
    """The text after "Answer:", or None when the model wrote no answer."""
    m = _ANSWER_RE.search(text)
    return m.group(1).strip() if m else None
