"""A synthetic MapReduce task that makes parallel decoding worth it.

The prompt lists named groups of digits; the answer is the sum of every
group. Each group is an independent sub-task written out step by step
(20 to 80 tokens), so a Goal gets one Outline per group, one Path per
Outline, and a Conclusion that collects the Path results into the final,
exactly checkable answer:

- one group: a plain answer, no Parallel block (the sequential path);
- 2 to 8 groups: one Parallel block;
- two rounds of groups ("A: ... | B: ... ; C: ... | D: ..."): two blocks one
  after the other;
- a group split in parts ("A: 3 5 / 8 2"): that group's Path holds a nested
  block with one Path per part, and its Conclusion adds the part sums.

The texts follow the authors' serialisation (research notes, section 1.1):
every tag on its own line, "Let's think in parallel." before each block,
labels "1:", "2:", nested "1.1:", and the Path texts begin exactly with the
headers the engine writes ("\\n<Path>\\n{label}:").
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass

PARALLEL_CUE = "Let's think in parallel."
ANSWER_CUE = "Answer:"
INSTRUCTION = "Add up each group."


@dataclass(frozen=True)
class Group:
    name: str
    parts: tuple[tuple[int, ...], ...]  # one part, or several for a nested block

    @property
    def digits(self) -> tuple[int, ...]:
        return tuple(d for p in self.parts for d in p)

    @property
    def total(self) -> int:
        return sum(self.digits)

    def prompt_text(self) -> str:
        return f"{self.name}: " + " / ".join(" ".join(map(str, p)) for p in self.parts)


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
            " | ".join(g.prompt_text() for g in r) for r in self.rounds
        )

    def answer(self) -> str:
        return " ".join(str(g.total) for g in self.groups)

    def completion(self) -> str:
        """The assistant's whole text, as the model is trained to write it."""
        if not self.parallel:
            (g,) = self.groups
            body = _steps(g.digits)
        else:
            body = "".join(_block(r, prefix="") for r in self.rounds)
        return f"<Think>\n{body}</Think>\n\n{ANSWER_CUE} {self.answer()}"


def _steps(digits: tuple[int, ...]) -> str:
    lines = [" ".join(map(str, digits))]
    acc = digits[0]
    for d in digits[1:]:
        lines.append(f"{acc}+{d}={acc + d}")
        acc += d
    lines.append(f"={acc}")
    return "".join(line + "\n" for line in lines)


def _block(groups: tuple[Group, ...], prefix: str) -> str:
    labels = [f"{prefix}{k + 1}" for k in range(len(groups))]
    out = [f"{PARALLEL_CUE}\n<Parallel>\n<Goal>\n"]
    for label, g in zip(labels, groups):
        out.append(f"<Outline>\n{label}: {g.name}\n</Outline>\n")
    out.append("</Goal>\n")
    for label, g in zip(labels, groups):
        out.append(f"<Path>\n{label}:{_path_body(g, label)}</Path>\n")
    out.append(f"<Conclusion>\n{' '.join(str(g.total) for g in groups)}\n</Conclusion>\n")
    out.append("</Parallel>\n")
    return "".join(out)


def _path_body(g: Group, label: str) -> str:
    if len(g.parts) == 1:
        return " " + _steps(g.digits)
    subs = tuple(Group(f"{g.name}{k + 1}", (p,)) for k, p in enumerate(g.parts))
    sums = [s.total for s in subs]
    inner = _block(subs, prefix=f"{label}.")
    # The nested Conclusion lists the part sums; the Path adds them up.
    lines, acc = [], sums[0]
    for s in sums[1:]:
        lines.append(f"{acc}+{s}={acc + s}")
        acc += s
    return f" {g.prompt_text()[len(g.name) + 2:]}\n{inner}" + "".join(x + "\n" for x in lines) + f"={acc}\n"


class TaskSampler:
    """Seeded task mix: 5% one group, 15% two rounds, 15% with a nested group.

    Groups hold 6 to 8 digits (Paths of about 50 to 80 tokens) and most
    prompts have many groups: the sequential part (Outlines, Conclusion,
    answer) costs about 15 tokens per group, so short Paths or few groups
    would leave little to parallelise.
    """

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def _group(self, name: str, nested: bool) -> Group:
        r = self.rng
        if nested:
            parts = tuple(
                tuple(r.randint(1, 9) for _ in range(r.randint(3, 4))) for _ in range(r.randint(2, 3))
            )
        else:
            parts = (tuple(r.randint(1, 9) for _ in range(r.randint(6, 8))),)
        return Group(name, parts)

    def sample(self) -> Task:
        r = self.rng
        kind = r.random()
        names = iter(string.ascii_uppercase)
        if kind < 0.05:
            return Task(((self._group(next(names), False),),))
        if kind < 0.20:
            sizes = (r.randint(4, 6), r.randint(4, 6))
        else:
            sizes = (r.choice((2, 3, 4, 5, 6, 6, 7, 7, 8, 8, 8)),)
        nest_at = -1
        if 0.20 <= kind < 0.35:
            nest_at = r.randrange(sizes[0])
        rounds = []
        k = 0
        for n in sizes:
            groups = []
            for _ in range(n):
                groups.append(self._group(next(names), nested=(k == nest_at)))
                k += 1
            rounds.append(tuple(groups))
        return Task(tuple(rounds))


_ANSWER_RE = re.compile(re.escape(ANSWER_CUE) + r" ?([0-9 ]*)")


def extract_answer(text: str) -> str | None:
    """The text after "Answer:", or None when the model wrote no answer."""
    m = _ANSWER_RE.search(text)
    return m.group(1).strip() if m else None
