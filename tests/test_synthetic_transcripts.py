"""The synthetic Multiverse-32B-shaped transcripts (benchmarks/synthetic_transcripts.py):
deterministic, exactly what the engine writes when forced to their tokens,
shaped like the 316 real outputs measured in MULTIVERSE.md section 1, and the committed sets
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
    # The figures of 316 real Multiverse-32B outputs (MULTIVERSE.md section 1):
    # 6,290 tokens an answer; ideal speedup 1.072 pooled, 1.030 median,
    # 1.183 at the 90th percentile, 1.81 at most.
    assert 0.97 * 6_290 <= s["answer_tokens"]["mean"] <= 1.03 * 6_290
    assert s["answer_tokens"]["max"] <= 1.05 * st.L_MAX  # blocks fit in the answer's length
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
    assert abs(ideal["pooled"] - 1.072) <= 0.01
    assert abs(ideal["median"] - 1.030) <= 0.01
    assert abs(ideal["p90"] - 1.183) <= 0.015
    assert 1.5 <= ideal["max"] <= 1.85
    assert ideal["median"] < ideal["pooled"] < ideal["p90"] < ideal["max"]
    assert 0.08 <= s["share_in_paths"] <= 0.2  # most of the text stays outside the Paths


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
    assert (small["n"], small["scale"], full["n"], full["scale"]) == (64, 0.5, 8, 1.0)
    # The CPU set keeps the real ratios at half the length.
    s = small["stats"]
    assert 0.9 * 6_290 / 2 <= s["answer_tokens"]["mean"] <= 1.1 * 6_290 / 2
    assert 2.5 <= s["blocks_per_answer"]["mean"] <= 3.5
    assert abs(s["ideal_speedup"]["pooled"] - 1.072) <= 0.015
    assert abs(s["ideal_speedup"]["median"] - 1.030) <= 0.015
    assert abs(s["ideal_speedup"]["p90"] - 1.183) <= 0.03
    f = full["stats"]
    assert 0.98 * 6_290 <= f["answer_tokens"]["mean"] <= 1.02 * 6_290
    assert "0" not in f["blocks_per_answer"]["histogram"]  # a block in every answer
