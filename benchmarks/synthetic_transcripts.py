"""Synthetic Multiverse transcripts shaped like real Multiverse-32B outputs.

    python benchmarks/synthetic_transcripts.py --out DIR --n 64 --seed 0 [--scale 1.0]

Writes ``DIR/000.txt``... (one transcript each: the Qwen2.5 chat prompt of a
math problem, the answer in the authors' serialisation, ``<|im_end|>``) and
``DIR/set.json`` (seed, scale, statistics), and prints the set's statistics.
The text is written with the Multiverse-32B tokenizer of the test fixture
(``tests/multiverse32b.py``: Qwen2.5's byte-level BPE, the twelve tags at
151665-151676) and is exactly what the engine produces when it is forced to
these tokens: every engine-written header (``\\n<Path>\\n{label}`` with the
label's bare ``:``, ``<Conclusion>\\n``) is in the whole text's token ids
where the engine writes it (:func:`check_transcript`).

Targets, measured on 316 real outputs (AIME24, GPQA, MATH500 runs of the
authors' engine), each answer cut where the evaluator's own sections start
(the figures given first, 12,900 tokens and 1.035 pooled, had counted the
lower-cased copy of the answer that the evaluator's files append): an
answer averages 6,290 tokens, ~3 Parallel blocks of usually 2-4 Paths (up
to 16 Outlines), nesting up to depth 4, and the ideal speedup (output
tokens / critical-path tokens, engine positions) is 1.072 pooled, 1.030
median, 1.183 at the 90th percentile, 1.81 at most. The distributions that
reproduce them (lengths in tokens at ``--scale 1``; every length is
multiplied by the scale, the structure is drawn from its own random stream
so it does not change with the scale):

- answer length ``L``: lognormal, median 5,300, sigma 0.62, at most 15,600;
- Parallel blocks per answer: Poisson with mean ``3 * (L / 6,290) ** 0.8``
  (longer answers, to harder problems, hold more blocks), at most 16;
- an answer's parallel intensity ``q``: ``0.0085 * (L / 6,290) ** -0.5 *
  lognormal(0, 1.4)``, at most 0.15: a block's Paths are about ``q * L``
  tokens each, which grows with the square root of ``L``. The wide spread
  of ``q`` (a few answers are mostly parallel, most hardly) is what puts
  the 90th percentile far above the median and the pooled ideal speedup
  (length-weighted) between them;
- Paths per block: 2 (50%), 3 (26%), 4 (15%), 5 (4%), 6 (2%), 7 (1%),
  8 (0.8%), 10 (0.5%), 12 (0.4%), 16 (0.3%);
- a block's Path scale: ``q * L * lognormal(0, 0.3) / (paths - 1) ** 0.8 /
  2 ** (depth - 1)`` (many Outlines are short items; nested blocks are
  smaller), each Path's text ``scale * lognormal(0, 0.35)``, at least 6;
- a Path holds a nested block with probability 0.04 (depth at most 4),
  after 30-70% of its own text;
- an Outline's goal: 8-24 tokens; a Conclusion: lognormal, median 60,
  sigma 0.6, at least 8;
- the text after ``</Think>``: lognormal, median 220, sigma 0.5; the rest
  of ``L`` is sequential reasoning, split between the gaps around the
  blocks; blocks that would leave it less than 10% of ``L`` have their
  Paths shrunk to fit;
- an answer whose planned ideal speedup exceeds 1.8 has its Paths shrunk.

At a scale below 1 a text budget scales together with its fixed tags and
headers (``(text + overhead) * scale - overhead``, at least 2 tokens), so
that the parallel share, and the ideal speedup with it, stays about the
same. The text is templated math reasoning (sentences with numbers and
LaTeX) from a seeded RNG; Python's ``random.Random`` seeded with a string,
so a set is the same on every machine.

Resulting statistics (seed 0, 200 answers, scale 1): mean 6,271 tokens,
3.1 blocks per answer, ideal speedup 1.070 pooled, 1.031 median, 1.186 at
the 90th percentile, 1.76 at most; ``tests/test_synthetic_transcripts.py``
checks them against the targets, and ``benchmarks/transcripts/README.md``
gives them with the committed sets'. Seed 0's 200 answers sit at the low
end of the generator's spread: 1,200 answers (seeds 0-5) give 1.085
pooled, 1.034 median, 1.225 at the 90th percentile.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TRANSCRIPTS = ROOT / "benchmarks" / "transcripts"
IM_END = "<|im_end|>"
ASSISTANT_TURN = "<|im_start|>assistant\n"
GENERATOR_VERSION = 2

# The shape distributions (module docstring).
L_MEDIAN, L_SIGMA, L_MAX, L_MEAN = 5_300, 0.62, 15_600, 6_290
BLOCKS_PER_ANSWER, BLOCKS_POWER = 3.0, 0.8
MAX_BLOCKS = 16
Q_MEDIAN, Q_SIGMA, Q_MAX, Q_POWER = 0.0085, 1.4, 0.15, -0.5
PATHS_PER_BLOCK = ((2, 0.50), (3, 0.26), (4, 0.15), (5, 0.04), (6, 0.02), (7, 0.01),
                   (8, 0.008), (10, 0.005), (12, 0.004), (16, 0.003))
BLOCK_SIGMA, PATH_SIGMA, MANY_PATHS_POWER = 0.3, 0.35, 0.8
MIN_PATH, MIN_TEXT = 6, 2
P_NEST, MAX_DEPTH = 0.04, 4
GOAL_RANGE = (8, 24)
CONCLUSION_MEDIAN, CONCLUSION_SIGMA, MIN_CONCLUSION = 60, 0.6, 8
FINAL_MEDIAN, FINAL_SIGMA = 220, 0.5
MIN_SEQUENTIAL_SHARE = 0.1
IDEAL_CAP = 1.8
# Tokens the serialisation adds around a Path's text (\n <Path> \n label : ... \n </Path> \n)
# and around a block (tags and their newlines), for planning only.
PATH_OVERHEAD, BLOCK_OVERHEAD, OUTLINE_OVERHEAD = 7, 14, 6


# -- the plan: structure and token budgets -----------------------------------


@dataclass
class PathPlan:
    text: int  # the Path's own text, tokens
    nested: BlockPlan | None = None
    split: float = 0.5  # share of the text before the nested block


@dataclass
class BlockPlan:
    goals: list[int]
    paths: list[PathPlan]
    conclusion: int

    def tokens(self) -> tuple[float, float]:
        """(tokens, critical-path tokens), roughly: for planning."""
        out = BLOCK_OVERHEAD + self.conclusion + sum(g + OUTLINE_OVERHEAD for g in self.goals)
        crit, longest = out, 0.0
        for p in self.paths:
            own, own_crit = p.text + PATH_OVERHEAD, p.text + PATH_OVERHEAD
            if p.nested is not None:
                n_out, n_crit = p.nested.tokens()
                own, own_crit = own + n_out, own_crit + n_crit
            out += own
            longest = max(longest, own_crit)
        return out, crit + longest

    def scale_paths(self, factor: float) -> None:
        for p in self.paths:
            p.text = max(MIN_TEXT, round(p.text * factor))
            if p.nested is not None:
                p.nested.scale_paths(factor)


@dataclass
class AnswerPlan:
    sequential: list[int]  # one segment before, between and after the blocks
    blocks: list[BlockPlan]
    final: int  # the text after </Think>

    def ideal(self) -> float:
        seq = sum(self.sequential) + self.final
        parts = [b.tokens() for b in self.blocks]
        return (seq + sum(o for o, _ in parts)) / (seq + sum(c for _, c in parts))


def _lognormal(rng: random.Random, median: float, sigma: float) -> float:
    return median * rng.lognormvariate(0.0, sigma)


def _poisson(rng: random.Random, lam: float) -> int:
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p < limit:
            return k
        k += 1


def _scaled(text: float, overhead: int, scale: float) -> int:
    """A text budget at this scale: what scales is the part with its fixed
    serialisation (tags, headers), so that the share of parallel tokens, and
    with it the ideal speedup, stays the same at every scale."""
    return max(MIN_TEXT, round((text + overhead) * scale) - overhead)


def _paths_per_block(rng: random.Random) -> int:
    x, acc = rng.random(), 0.0
    for n, p in PATHS_PER_BLOCK:
        acc += p
        if x < acc:
            return n
    return PATHS_PER_BLOCK[0][0]


def _plan_block(rng: random.Random, depth: int, path_scale: float, scale: float) -> BlockPlan:
    n = _paths_per_block(rng)
    block_scale = (path_scale * rng.lognormvariate(0.0, BLOCK_SIGMA)
                   / (n - 1) ** MANY_PATHS_POWER / 2 ** (depth - 1))
    goals = [_scaled(rng.randint(*GOAL_RANGE), OUTLINE_OVERHEAD, scale) for _ in range(n)]
    paths = []
    for _ in range(n):
        text = _scaled(max(MIN_PATH, _lognormal(rng, block_scale, PATH_SIGMA)), PATH_OVERHEAD, scale)
        nested = None
        split = rng.uniform(0.3, 0.7)
        if depth < MAX_DEPTH and rng.random() < P_NEST:
            nested = _plan_block(rng, depth + 1, path_scale, scale)
        paths.append(PathPlan(text, nested, split))
    conclusion = _scaled(max(MIN_CONCLUSION, _lognormal(rng, CONCLUSION_MEDIAN, CONCLUSION_SIGMA)),
                         BLOCK_OVERHEAD, scale)
    return BlockPlan(goals, paths, conclusion)


def plan_answer(rng: random.Random, scale: float = 1.0) -> AnswerPlan:
    """An answer's structure and token budgets. Every draw happens whatever
    the scale, so the same seed gives the same structure at every scale."""
    length = min(L_MAX, _lognormal(rng, L_MEDIAN, L_SIGMA))
    rel = length / L_MEAN
    n_blocks = min(MAX_BLOCKS, _poisson(rng, BLOCKS_PER_ANSWER * rel**BLOCKS_POWER))
    q = min(Q_MAX, Q_MEDIAN * rel**Q_POWER * rng.lognormvariate(0.0, Q_SIGMA))
    blocks = [_plan_block(rng, 1, q * length, scale) for _ in range(n_blocks)]
    final = round(_lognormal(rng, FINAL_MEDIAN, FINAL_SIGMA) * scale)
    weights = [rng.expovariate(1.0) for _ in range(n_blocks + 1)]
    total = length * scale
    # Blocks that leave less than MIN_SEQUENTIAL_SHARE of the answer to the
    # sequential text have their Paths shrunk to fit (the bound only guards
    # against overheads alone exceeding the room: the texts stop at MIN_TEXT).
    in_blocks = sum(b.tokens()[0] for b in blocks)
    for _ in range(40):
        if in_blocks + final <= (1 - MIN_SEQUENTIAL_SHARE) * total:
            break
        for b in blocks:
            b.scale_paths(0.9)
        in_blocks = sum(b.tokens()[0] for b in blocks)
    seq = max(total - in_blocks - final, MIN_SEQUENTIAL_SHARE * total)
    sequential = [max(8, round(seq * w / sum(weights))) for w in weights]
    plan = AnswerPlan(sequential, blocks, final)
    for _ in range(40):
        if plan.ideal() <= IDEAL_CAP:
            break
        for b in blocks:
            b.scale_paths(0.8)
    return plan


# -- the text: templated math reasoning ----------------------------------------


def _n(rng: random.Random, lo: int = 2, hi: int = 99) -> int:
    return rng.randint(lo, hi)


def _var(rng: random.Random) -> str:
    return rng.choice("xyzabnkmt")


# Every sentence starts with a letter: a Path's text follows its label's ":"
# and a space, and the Conclusion's follows the header's "\n", both as the
# engine writes them; a letter never merges with either.
SENTENCES: tuple[Callable[[random.Random], str], ...] = (
    lambda r: (lambda a, b: f"We have ${a} + {b} = {a + b}$.")(_n(r), _n(r)),
    lambda r: (lambda a, v: f"Let ${v} = {a}$, so ${v}^2 = {a * a}$.")(_n(r), _var(r)),
    lambda r: (lambda a, b: f"Multiplying both sides by ${b}$ gives ${b}x = {a * b}$, so $x = {a}$.")(_n(r), _n(r, 2, 12)),
    lambda r: (lambda a, b: f"So the remainder when ${a}$ is divided by ${b}$ is ${a % b}$.")(_n(r, 100, 999), _n(r, 3, 17)),
    lambda r: (lambda a, b: f"Hmm, that gives {a}, which is less than {b}, so this case fails.")(_n(r), _n(r, 100, 200)),
    lambda r: (lambda a, b: f"Since $\\gcd({a * 6}, {b * 6}) = {math.gcd(a * 6, b * 6)}$, the fraction $\\frac{{{a * 6}}}{{{b * 6}}}$ reduces.")(_n(r, 2, 30), _n(r, 2, 30)),
    lambda r: (lambda a, b: f"The area is $\\frac{{1}}{{2}} \\cdot {a} \\cdot {b} = {a * b / 2:g}$.")(_n(r, 2, 40), _n(r, 2, 40)),
    lambda r: (lambda k, a, b: f"Consider the polynomial $p(x) = x^{k} - {a}x + {b}$.")(_n(r, 2, 6), _n(r), _n(r)),
    lambda r: (lambda a, b: f"By the Pythagorean theorem, ${a}^2 + {b}^2 = {a * a + b * b}$.")(_n(r, 3, 30), _n(r, 3, 30)),
    lambda r: (lambda n, k: f"That means there are $\\binom{{{n}}}{{{k}}} = {math.comb(n, k)}$ ways to choose them.")(_n(r, 5, 20), _n(r, 2, 4)),
    lambda r: "Wait, let me double-check that step.",
    lambda r: "Let me verify this with a small case first.",
    lambda r: (lambda n: f"For $n = {n}$, the sum of the first $n$ odd numbers is ${n * n}$, as expected.")(_n(r, 2, 40)),
    lambda r: (lambda a, b: f"Then ${a} \\times {b} = {a * b}$.")(_n(r), _n(r)),
    lambda r: (lambda v, a, b: f"Substituting ${v} = {a}$ into the equation gives ${a} + {b} = {a + b}$, which is consistent.")(_var(r), _n(r), _n(r)),
    lambda r: (lambda a: f"Note that ${a}$ is {'even' if a % 2 == 0 else 'odd'}, so the parity argument applies.")(_n(r)),
    lambda r: "Actually, I should be careful about the boundary cases here.",
    lambda r: (lambda a, b: f"The number of multiples of ${b}$ up to ${a}$ is $\\lfloor {a}/{b} \\rfloor = {a // b}$.")(_n(r, 100, 2000), _n(r, 2, 13)),
    lambda r: (lambda a, b: f"Taking the derivative, $f'(x) = {a}x - {b}$, which vanishes at $x = \\frac{{{b}}}{{{a}}}$.")(_n(r, 2, 20), _n(r, 2, 50)),
    lambda r: (lambda a: f"So the probability is $\\frac{{1}}{{{a}}}$ for each of the outcomes.")(_n(r, 2, 36)),
    lambda r: "This matches the earlier computation, so the approach seems right.",
    lambda r: (lambda a, b: f"In modular arithmetic, ${a} \\equiv {a % b} \\pmod{{{b}}}$.")(_n(r, 20, 500), _n(r, 3, 11)),
    lambda r: (lambda a, b, c: f"The quadratic $x^2 - {a + b}x + {a * b} = 0$ has roots ${a}$ and ${b}$, and their sum is ${a + b}$ while $c = {c}$.")(_n(r, 1, 20), _n(r, 1, 20), _n(r)),
    lambda r: "Now I need to count the remaining configurations.",
    lambda r: (lambda a: f"Each of the ${a}$ vertices has degree at least $2$.")(_n(r, 4, 30)),
    lambda r: (lambda a, b: f"Adding the two equations gives $2x = {2 * a}$, hence $x = {a}$ and $y = {b}$.")(_n(r), _n(r)),
    lambda r: "Alternatively, we could use symmetry to simplify the problem.",
    lambda r: (lambda a: f"Hence the answer so far is ${a}$, but we still need the other term.")(_n(r, 10, 999)),
    lambda r: (lambda a, b: f"The sequence increases by ${b}$ each step, so the ${a}$th term is ${1 + (a - 1) * b}$.")(_n(r, 5, 60), _n(r, 2, 9)),
    lambda r: "But wait, that contradicts the assumption that the terms are distinct.",
    lambda r: (lambda a: f"Let me recompute: $\\sqrt{{{a * a}}} = {a}$.")(_n(r, 2, 60)),
    lambda r: (lambda a, b: f"So we need ${a}k + {b}$ to be a perfect square.")(_n(r, 2, 20), _n(r, 1, 20)),
    lambda r: "Okay, so that part is settled.",
    lambda r: (lambda a, b: f"If the triangle has sides ${a}$, ${b}$ and ${a + b - 1}$, the triangle inequality holds.")(_n(r, 2, 30), _n(r, 2, 30)),
    lambda r: (lambda a: f"Summing over all ${a}$ cases gives the total count.")(_n(r, 2, 12)),
)
# Short ones, to land close to small budgets.
SHORT: tuple[Callable[[random.Random], str], ...] = (
    lambda r: f"So ${_var(r)} = {_n(r)}$.",
    lambda r: "Good.",
    lambda r: "That works.",
    lambda r: f"Check: ${(a := _n(r))} + {(b := _n(r))} = {a + b}$.",
    lambda r: f"It is {_n(r)}.",
    lambda r: "Right.",
    lambda r: "Yes.",
    lambda r: f"So it is ${_n(r)}$.",
    lambda r: "That checks out.",
    lambda r: f"Then ${_var(r)} = {_n(r)}$ and we are done with this part.",
)
GOALS: tuple[Callable[[random.Random], str], ...] = (
    lambda r: f"Compute the value of $f({_n(r)})$ using the recursion.",
    lambda r: f"Count the multiples of ${_n(r, 2, 13)}$ in the range.",
    lambda r: f"Check the case where ${_var(r)}$ is even.",
    lambda r: f"Check the case where ${_var(r)}$ is odd.",
    lambda r: f"Find the remainder modulo ${_n(r, 3, 17)}$.",
    lambda r: "Verify the boundary cases.",
    lambda r: f"Solve the equation for $x = {_n(r)}$ and compare with the bound.",
    lambda r: "Compute the area of the second triangle.",
    lambda r: f"Evaluate the sum of the first ${_n(r, 5, 50)}$ terms.",
    lambda r: "Determine whether the discriminant is positive.",
)
PROBLEMS: tuple[Callable[[random.Random], str], ...] = (
    lambda r: f"Find the number of ordered pairs $(a, b)$ of positive integers with $a + b \\le {_n(r, 20, 200)}$ such that $ab$ is divisible by ${_n(r, 3, 12)}$.",
    lambda r: f"Let $f(x) = x^2 - {_n(r)}x + {_n(r)}$. Find the sum of all real $x$ with $f(f(x)) = 0$.",
    lambda r: f"A triangle has sides ${_n(r, 5, 20)}$, ${_n(r, 5, 20)}$ and ${_n(r, 5, 20)}$. Find its area.",
    lambda r: f"What is the remainder when $2^{{{_n(r, 100, 999)}}}$ is divided by ${_n(r, 7, 97)}$?",
    lambda r: f"How many subsets of $\\{{1, 2, \\ldots, {_n(r, 8, 20)}\\}}$ contain no two consecutive integers?",
)
LEAD_INS = ("Let's think in parallel.", "These parts are independent, so let's think in parallel.",
            "Let me split this into separate cases.")
SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."


class TokenCounter:
    """Token counts of text pieces without encoding each piece whole: the
    pre-tokenizer's words, each counted once (the text repeats words)."""

    def __init__(self, tokenizer: Any) -> None:
        self._bt = tokenizer.backend_tokenizer
        self._words: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        n = 0
        for word, _ in self._bt.pre_tokenizer.pre_tokenize_str(text):
            if (c := self._words.get(word)) is None:
                c = self._words[word] = len(self._bt.model.tokenize(word))
            n += c
        return n


class Writer:
    """Text of about a given number of tokens, from a seeded RNG."""

    def __init__(self, rng: random.Random, count: Callable[[str], int]) -> None:
        self.rng = rng
        self.count = count

    def sentences(self, budget: int, pool: Sequence[Callable[[random.Random], str]] = SENTENCES,
                  paragraphs: bool = False) -> str:
        """Sentences until the budget is met as closely as a sentence allows
        (a short one where a long one overshoots); at least one. Paragraphs
        (of 2-6 sentences) are split by a blank line."""
        out: list[str] = []
        used, in_para, para_len = 0, 0, self.rng.randint(2, 6)
        while used < budget:
            sep = "" if not out else ("\n\n" if paragraphs and in_para >= para_len else " ")
            text = sep + self.rng.choice(pool)(self.rng)
            cost = self.count(text)
            if used + cost > budget:
                for _ in range(3):
                    short = sep + self.rng.choice(SHORT)(self.rng)
                    short_cost = self.count(short)
                    if abs(used + short_cost - budget) < abs(used + cost - budget):
                        text, cost = short, short_cost
                if out and used + cost - budget >= budget - used:
                    break
            out.append(text)
            used += cost
            if sep == "\n\n":
                in_para, para_len = 0, self.rng.randint(2, 6)
            in_para += 1
        return "".join(out)

    def goal(self, budget: int) -> str:
        text = self.rng.choice(GOALS)(self.rng)
        extra = budget - self.count(" " + text)
        return text if extra < 4 else text + " " + self.sentences(extra)


# -- rendering: plan -> the authors' serialisation ---------------------------------


def render_block(plan: BlockPlan, w: Writer, prefix: str = "") -> str:
    labels = [f"{prefix}{k + 1}" for k in range(len(plan.paths))]
    parts = ["<Parallel>\n<Goal>\n"]
    parts += [f"<Outline>\n{lab}: {w.goal(g)}\n</Outline>\n" for lab, g in zip(labels, plan.goals)]
    parts.append("</Goal>\n")
    for lab, p in zip(labels, plan.paths):
        if p.nested is None:
            body = w.sentences(p.text)
        else:
            before = max(1, round(p.text * p.split))
            after = p.text - before
            body = (f"{w.sentences(before)} {w.rng.choice(LEAD_INS)}\n"
                    f"{render_block(p.nested, w, lab + '.')}")
            # A short rest would be a stray sentence: the Path ends with the block.
            body = body + w.sentences(after) if after >= 3 else body.rstrip("\n")
        parts.append(f"<Path>\n{lab}: {body}\n</Path>\n")
    parts.append(f"<Conclusion>\n{w.sentences(plan.conclusion)}\n</Conclusion>\n</Parallel>\n")
    return "".join(parts)


def render_answer(plan: AnswerPlan, w: Writer) -> str:
    parts = ["<Think>\n"]
    for k, seg in enumerate(plan.sequential):
        parts.append(w.sentences(seg, paragraphs=True))
        if k < len(plan.blocks):
            parts.append(f" {w.rng.choice(LEAD_INS)}\n{render_block(plan.blocks[k], w)}")
        else:
            parts.append("\n")
    answer = w.rng.randint(2, 999)
    parts.append(f"</Think>\n\n{w.sentences(plan.final)}\n\nAnswer: $\\boxed{{{answer}}}${IM_END}")
    return "".join(parts)


def chat_prompt(tokenizer: Any, problem: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": problem}], tokenize=False,
                                         add_generation_prompt=True)


def generate(tokenizer: Any, seed: int, index: int, scale: float = 1.0,
             count: Callable[[str], int] | None = None) -> str:
    """Transcript ``index`` of the set with this seed: the structure comes from
    one random stream, the words from another."""
    plan = plan_answer(random.Random(f"plan-{seed}-{index}"), scale)
    w = Writer(random.Random(f"text-{seed}-{index}"), count or TokenCounter(tokenizer))
    problem = w.rng.choice(PROBLEMS)(w.rng) + SUFFIX
    return chat_prompt(tokenizer, problem) + render_answer(plan, w)


# -- the fixture's tokenizer and the engine's reading of it ------------------------------


class Fixture:
    """The Multiverse-32B-shaped tokenizer (tests/multiverse32b.py) and the
    structure ids the engine derives from it."""

    def __init__(self, tokenizer_dir: Path | None = None) -> None:
        from transformers import AutoTokenizer

        if tokenizer_dir is None:
            sys.path.insert(0, str(ROOT / "tests"))
            import multiverse32b

            self._tmp = tempfile.TemporaryDirectory(prefix="mv32b-tokenizer-")
            tokenizer_dir = Path(self._tmp.name)
            multiverse32b.write_tokenizer(tokenizer_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.count = TokenCounter(self.tokenizer)

    @cached_property
    def tokens(self) -> Any:
        from vllm_multiverse.model_config import derive_declaration, read_model_declaration

        info = read_model_declaration({"multiverse": derive_declaration(self.tokenizer)})
        return info.tokens

    def generate(self, seed: int, index: int, scale: float = 1.0) -> str:
        return generate(self.tokenizer, seed, index, scale, self.count)


# -- checks and statistics --------------------------------------------------------


@dataclass
class Parsed:
    """A transcript's token ids and structure, read once (the engine's
    positions: the critical path is read off them)."""

    text: str
    ids: list[int]
    prompt_len: int
    structure: Any

    @property
    def critical_path(self) -> int:
        # tiny_model.evaluate.critical_path on the structure
        # already computed (the tests check that the two agree).
        pos = self.structure.positions
        return int(pos[-1] - pos[self.prompt_len - 1])


def split_prompt(text: str) -> tuple[str, str]:
    """(prompt, answer): the prompt runs through the assistant turn's header."""
    cut = text.rindex(ASSISTANT_TURN) + len(ASSISTANT_TURN)
    return text[:cut], text[cut:]


def parse(text: str, fx: Fixture) -> Parsed:
    from vllm_multiverse.structure import StructureConfig, analyze

    tok = fx.tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    prompt_len = len(tok.encode(split_prompt(text)[0], add_special_tokens=False))
    return Parsed(text, ids, prompt_len, analyze(ids, fx.tokens, StructureConfig(positions="engine")))


def check_transcript(p: Parsed, fx: Fixture) -> list[str]:
    """What keeps a forced replay of this transcript from reproducing it
    token for token; empty when nothing does."""
    from vllm_multiverse.structure import EventKind

    tok, t, ids, s = fx.tokenizer, fx.tokens, p.ids, p.structure
    problems = []
    if tok.decode(ids, skip_special_tokens=False) != p.text:
        problems.append("decode(encode(text)) != text")
    # A replay may encode the prompt and the answer apart.
    prompt, answer = split_prompt(p.text)
    if tok.encode(prompt, add_special_tokens=False) + tok.encode(answer, add_special_tokens=False) != ids:
        problems.append("the prompt and the answer do not tokenize apart as they do together")
    im_end = tok.convert_tokens_to_ids(IM_END)
    if ids[-1] != im_end or ids[p.prompt_len :].count(im_end) != 1:
        problems.append(f"the answer does not end with its only {IM_END}")
    problems += [f"malformed at token {n.index}: {n.message}" for n in s.notes]
    if s.open_blocks:
        problems.append(f"{s.open_blocks} Parallel block(s) left open")
    if any(e.index < p.prompt_len for e in s.events):
        problems.append("the prompt holds Multiverse events")
    lead = len(t.path_header_lead)
    for e in s.events:
        if e.kind is EventKind.FORK:
            spans = [sp for sp in s.spans if sp.block == e.block]
            if len(spans) != len(e.branch_headers):
                problems.append(f"block at {e.block}: {len(spans)} Paths for {len(e.branch_headers)} Outlines")
            # Path 1's lead "\n" follows </Goal>; a later Path's is the
            # previous Path's tail: either way the whole header is there.
            for k, (sp, header) in enumerate(zip(spans, e.branch_headers)):
                at = sp.start - lead
                if tuple(ids[at : at + len(header)]) != header:
                    problems.append(f"block at {e.block}, Path {k + 1}: header not verbatim at token {at}")
            if spans and spans[0].start - lead != e.index + 1:
                problems.append(f"block at {e.block}: Path 1 does not follow </Goal>")
        elif e.kind is EventKind.CONCLUSION:
            got = tuple(ids[e.index + 1 : e.index + 1 + len(t.conclusion_header)])
            if got != t.conclusion_header:
                problems.append(f"block at {e.block}: Conclusion header not verbatim at token {e.index + 1}")
    return problems


@dataclass
class TranscriptStats:
    answer_tokens: int
    critical_path: int
    paths_per_block: list[int]
    depths: list[int]  # one per block
    in_blocks: int  # answer tokens inside a Parallel block
    in_paths: int  # answer tokens inside a Path

    @property
    def ideal(self) -> float:
        return self.answer_tokens / max(1, self.critical_path)


def transcript_stats(p: Parsed) -> TranscriptStats:
    from vllm_multiverse.structure import EventKind, Part

    s, n = p.structure, p.prompt_len
    forks = [e for e in s.events if e.kind is EventKind.FORK]
    return TranscriptStats(
        answer_tokens=len(p.ids) - n,
        critical_path=p.critical_path,
        paths_per_block=[len(e.branch_headers) for e in forks],
        depths=[e.depth for e in forks],
        in_blocks=int((s.block[n:] >= 0).sum()),
        in_paths=int((s.part[n:] == Part.PATH).sum()),
    )


def set_stats(stats: Sequence[TranscriptStats]) -> dict[str, Any]:
    lengths = [s.answer_tokens for s in stats]
    ideals = [s.ideal for s in stats]
    per_block = [n for s in stats for n in s.paths_per_block]
    blocks = [len(s.paths_per_block) for s in stats]
    return {
        "transcripts": len(stats),
        "answer_tokens": {"mean": round(statistics.mean(lengths)), "median": round(statistics.median(lengths)),
                          "max": max(lengths), "min": min(lengths)},
        "blocks_per_answer": {"mean": round(statistics.mean(blocks), 3),
                              "histogram": dict(sorted(Counter(blocks).items()))},
        "paths_per_block": dict(sorted(Counter(per_block).items())),
        "nesting_depth": dict(sorted(Counter(d for s in stats for d in s.depths).items())),
        "share_in_blocks": round(sum(s.in_blocks for s in stats) / sum(lengths), 4),
        "share_in_paths": round(sum(s.in_paths for s in stats) / sum(lengths), 4),
        "ideal_speedup": {"pooled": round(sum(lengths) / sum(s.critical_path for s in stats), 4),
                          "median": round(statistics.median(ideals), 4),
                          "p90": round(statistics.quantiles(ideals, n=10, method="inclusive")[-1], 4),
                          "max": round(max(ideals), 4)},
    }


def format_stats(st: dict[str, Any]) -> str:
    a, b, i = st["answer_tokens"], st["blocks_per_answer"], st["ideal_speedup"]
    return "\n".join([
        f"transcripts: {st['transcripts']}",
        f"answer tokens: mean {a['mean']:,} median {a['median']:,} min {a['min']:,} max {a['max']:,}",
        f"blocks per answer: mean {b['mean']:.2f}, histogram {b['histogram']}",
        f"Paths per block: {st['paths_per_block']}",
        f"nesting depth (blocks): {st['nesting_depth']}",
        f"inside blocks: {st['share_in_blocks']:.1%} of answer tokens, inside Paths {st['share_in_paths']:.1%}",
        f"ideal speedup: pooled {i['pooled']:.4f} median {i['median']:.4f} p90 {i['p90']:.4f} max {i['max']:.4f}",
    ])


# -- the committed sets -------------------------------------------------------------

MANIFEST = "set.json"


def write_set(fx: Fixture, out: Path, n: int, seed: int, scale: float) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    stats = []
    for i in range(n):
        text = fx.generate(seed, i, scale)
        p = parse(text, fx)
        if problems := check_transcript(p, fx):
            raise RuntimeError(f"transcript {i}: {problems}")
        (out / f"{i:03d}.txt").write_text(text)
        stats.append(transcript_stats(p))
    st = set_stats(stats)
    manifest = {"generator": "benchmarks/synthetic_transcripts.py", "version": GENERATOR_VERSION,
                "seed": seed, "scale": scale, "n": n, "stats": st}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return st


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--tokenizer", type=Path, default=None,
                    help="a Multiverse-32B tokenizer directory (default: the test fixture's, written to a temp dir)")
    args = ap.parse_args(argv)
    st = write_set(Fixture(args.tokenizer), args.out, args.n, args.seed, args.scale)
    print(format_stats(st))


if __name__ == "__main__":
    main()
