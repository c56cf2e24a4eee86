"""The synthetic Multiverse-32B-shaped transcripts (benchmarks/synthetic_transcripts.py):
deterministic, exactly what the engine writes when forced to their tokens,
shaped like the 316 real outputs the issue measured, and the committed sets
still what the generator makes."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import synthetic_transcripts as st  # noqa: E402

from tiny_model.evaluate import critical_path  # noqa: E402
from vllm_multiverse.structure import EventKind  # noqa: E402

COMMITTED = sorted(p.parent for p in st.TRANSCRIPTS.glob(f"*/{st.MANIFEST}")
                   if json.loads(p.read_text()).get("generator") == "benchmarks/synthetic_transcripts.py")


@pytest.fixture(scope="module")
def fx() -> st.Fixture:
    return st.Fixture()


def _forks(p: st.Parsed) -> list[tuple[int, int]]:
    return [(e.depth, len(e.branch_headers)) for e in p.structure.events if e.kind is EventKind.FORK]


def test_deterministic_per_seed_and_structure_independent_of_scale(fx):
    a = [fx.generate(3, i, 0.25) for i in range(3)]
    assert a == [fx.generate(3, i, 0.25) for i in range(3)]
    assert a != [fx.generate(4, i, 0.25) for i in range(3)]
    for i in range(6):
        small, full = st.parse(fx.generate(5, i, 0.25), fx), st.parse(fx.generate(5, i, 1.0), fx)
        assert _forks(small) == _forks(full)
        assert len(full.ids) > 2.5 * len(small.ids)


def test_generated_transcripts_replay_exactly(fx):
    parsed = [st.parse(fx.generate(0, i, 0.25), fx) for i in range(12)]
    assert all(st.check_transcript(p, fx) == [] for p in parsed)
    depths = [d for p in parsed for d, _ in _forks(p)]
    assert 1 in depths and 2 in depths  # nested blocks are among those checked
    # The critical path read off the one analysis is evaluate.critical_path's.
    for p in parsed[:4]:
        assert p.critical_path == critical_path(p.ids, p.prompt_len, fx.tokens)


@pytest.mark.parametrize(
    "old, new, why",
    [
        ("\n<Path>\n2: ", "\n<Path>\n2:\n", "header not verbatim"),  # ":\n" is one token
        ("</Goal>\n<Path>", "</Goal>\n\n<Path>", "header not verbatim"),  # "\n\n" is one token
        ("<Conclusion>\n", "<Conclusion>\n\n", "Conclusion header not verbatim"),
        ("</Path>\n<Conclusion>", "</Path>\n</Parallel>\n<Conclusion>", "malformed"),
        ("<|im_end|>", "", "does not end"),
    ],
)
def test_check_finds_what_a_forced_replay_would_not_reproduce(fx, old, new, why):
    text = next(t for i in range(20) if "\n<Path>\n2: " in (t := fx.generate(0, i, 0.25)))
    broken = text[: text.rindex(old)] + new + text[text.rindex(old) + len(old):]
    problems = st.check_transcript(st.parse(broken, fx), fx)
    assert any(why in p for p in problems), problems


def test_statistics_of_200_full_length_answers_match_real_outputs(fx):
    stats = [st.transcript_stats(st.parse(fx.generate(0, i, 1.0), fx)) for i in range(200)]
    s = st.set_stats(stats)
    # The figures on 316 real Multiverse-32B outputs.
    assert 0.92 * 12_900 <= s["answer_tokens"]["mean"] <= 1.08 * 12_900
    assert 2.6 <= s["blocks_per_answer"]["mean"] <= 3.4
    assert 0 in s["blocks_per_answer"]["histogram"]  # some answers hold none
    per_block = [n for x in stats for n in x.paths_per_block]
    assert min(per_block) >= 2 and max(per_block) <= 16
    assert sum(2 <= n <= 4 for n in per_block) >= 0.85 * len(per_block)
    assert max(per_block) > 4  # more are rare, not absent
    depths = [d for x in stats for d in x.depths]
    assert 2 in depths and max(depths) <= st.MAX_DEPTH
    assert sum(d > 1 for d in depths) <= 0.15 * len(depths)
    ideal = s["ideal_speedup"]
    assert 1.02 <= ideal["pooled"] <= 1.05
    assert 1.008 <= ideal["median"] <= 1.025
    assert 1.1 <= ideal["max"] <= 1.3
    assert s["share_in_paths"] < 0.15  # the text inside blocks is a small share


@pytest.mark.parametrize("set_dir", COMMITTED, ids=lambda p: p.name)
def test_committed_set_is_what_the_generator_makes(fx, set_dir):
    manifest = json.loads((set_dir / st.MANIFEST).read_text())
    files = sorted(set_dir.glob("*.txt"))
    assert [f.name for f in files] == [f"{i:03d}.txt" for i in range(manifest["n"])]
    stats = []
    for i, f in enumerate(files):
        text = f.read_text()
        assert text == fx.generate(manifest["seed"], i, manifest["scale"]), f"{f} drifted from the generator"
        p = st.parse(text, fx)
        assert st.check_transcript(p, fx) == []
        stats.append(st.transcript_stats(p))
    assert json.loads(json.dumps(st.set_stats(stats))) == manifest["stats"]


def test_the_committed_sets_are_the_ones_the_benchmarks_expect():
    small, full = (json.loads((st.TRANSCRIPTS / d / st.MANIFEST).read_text())
                   for d in ("mv32b-shaped", "mv32b-shaped-full"))
    assert (small["n"], small["scale"], full["n"], full["scale"]) == (64, 0.25, 8, 1.0)
    # The CPU set keeps the real ratios at a quarter of the length.
    s = small["stats"]
    assert 0.85 * 12_900 / 4 <= s["answer_tokens"]["mean"] <= 1.15 * 12_900 / 4
    assert 2.5 <= s["blocks_per_answer"]["mean"] <= 3.5
    assert 1.02 <= s["ideal_speedup"]["pooled"] <= 1.05
    assert 1.008 <= s["ideal_speedup"]["median"] <= 1.025
    assert 0.9 * 12_900 <= full["stats"]["answer_tokens"]["mean"] <= 1.1 * 12_900
