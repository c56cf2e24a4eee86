"""The structure rule on hand-written examples; expected values worked out by hand."""

import numpy as np
import pytest
from toy_vocab import TOKENS, VOCAB, ids

from vllm_multiverse.structure import EventKind, Part, StructureConfig, analyze

# research/multiverse-authors-engine.md section 4.3, also docs/structure.md.
WORKED = ids(
    "x <Parallel> NL <Goal> NL <Outline> o1 </Outline> <Outline> o2 </Outline> </Goal> NL "
    "<Path> NL 1 : a a </Path> NL <Path> NL 2 : b </Path> NL <Conclusion> NL c </Conclusion> NL "
    "</Parallel> y"
)
WORKED_TRAINING = list(range(13)) + [12, 13, 14, 15, 16, 17, 18, 19] + [12, 13, 14, 15, 16, 17, 18] + list(
    range(19, 26)
)
WORKED_ENGINE = list(range(21)) + [13, 14, 15, 16, 17, 18, 19] + list(range(21, 28))


def _expected_mask(n, hidden):
    m = np.tri(n, dtype=bool)
    for q0, q1, k0, k1 in hidden:
        m[q0:q1, k0:k1] = False
    return m


@pytest.mark.parametrize(
    "convention,expected", [("training", WORKED_TRAINING), ("engine", WORKED_ENGINE)]
)
def test_worked_example_positions(convention, expected):
    s = analyze(WORKED, TOKENS, StructureConfig(positions=convention))
    assert s.positions.tolist() == expected


def test_worked_example_mask_and_parts():
    s = analyze(WORKED, TOKENS)
    # Path 2 (<Path> at 21 through its tail "\n" at 27) never sees Path 1
    # (13..20), the "\n" after Path 1's </Path> included.
    assert np.array_equal(s.dense_mask(), _expected_mask(len(WORKED), [(21, 28, 13, 21)]))
    assert [(sp.start, sp.end) for sp in s.spans] == [(13, 21), (21, 28)]
    assert s.part[0] == Part.OUTSIDE and s.part[11] == Part.GOAL
    assert s.part[12] == Part.BETWEEN and s.part[20] == Part.PATH and s.part[28] == Part.CONCLUSION
    assert s.part[33] == Part.CONCLUSION and s.part[34] == Part.OUTSIDE
    assert s.visible_ranges(24) == [(0, 13), (21, 25)]
    assert s.visible_ranges(30) == [(0, 31)]


def test_worked_example_events():
    s = analyze(WORKED, TOKENS)
    fork, nxt, concl = s.events
    assert (fork.kind, fork.index) == (EventKind.FORK, 11)
    assert fork.branch_headers == (tuple(ids("NL <Path> NL o1")), tuple(ids("NL <Path> NL o2")))
    assert fork.write == tuple(ids("NL <Path> NL o1"))
    # After Path 1's tail the sequential layer writes Path 2's header without
    # the shared leading "\n"; after the last Path, the Conclusion header.
    assert (nxt.kind, nxt.index, nxt.write) == (EventKind.NEXT_PATH, 20, tuple(ids("<Path> NL o2")))
    assert (concl.kind, concl.index, concl.write) == (
        EventKind.CONCLUSION,
        27,
        tuple(ids("<Conclusion> NL")),
    )


NESTED = ids(
    "x <Parallel> <Goal> <Outline> 1 : </Outline> <Outline> 2 : </Outline> </Goal> NL "  # 0-12
    "<Path> 1 : a "  # 13-16
    "<Parallel> <Goal> <Outline> 1 . 1 : </Outline> <Outline> 1 . 2 : </Outline> </Goal> NL "  # 17-32
    "<Path> b </Path> NL <Path> c d </Path> NL <Conclusion> a </Conclusion> </Parallel> "  # 33-45
    "a </Path> NL <Path> 2 : b </Path> NL <Conclusion> c </Conclusion> </Parallel> y"  # 46-59
)
NESTED_TRAINING = (
    list(range(13)) + [12, 13, 14, 15] + list(range(16, 32)) + [31, 32, 33, 34, 31, 32, 33, 34, 35]
    + [35, 36, 37, 38, 39, 40, 41] + [12, 13, 14, 15, 16, 17] + [41, 42, 43, 44, 45]
)
NESTED_ENGINE = (
    list(range(37)) + [33, 34, 35, 36, 37] + list(range(38, 45)) + [13, 14, 15, 16, 17, 18]
    + [45, 46, 47, 48, 49]
)


@pytest.mark.parametrize(
    "convention,expected", [("training", NESTED_TRAINING), ("engine", NESTED_ENGINE)]
)
def test_nested_positions(convention, expected):
    assert len(NESTED) == 60
    s = analyze(NESTED, TOKENS, StructureConfig(positions=convention))
    assert s.positions.tolist() == expected


def test_nested_mask_events_chains():
    s = analyze(NESTED, TOKENS)
    hidden = [(37, 42, 33, 37), (49, 55, 13, 49)]
    assert np.array_equal(s.dense_mask(), _expected_mask(60, hidden))
    assert [(e.kind, e.index, e.depth) for e in s.events] == [
        (EventKind.FORK, 11, 1),
        (EventKind.FORK, 31, 2),
        (EventKind.NEXT_PATH, 36, 2),
        (EventKind.CONCLUSION, 41, 2),
        (EventKind.NEXT_PATH, 48, 1),
        (EventKind.CONCLUSION, 54, 1),
    ]
    inner_fork = s.events[1]
    assert inner_fork.branch_headers[1] == tuple(ids("NL <Path> NL 1 . 2 :"))
    assert s.events[2].write == tuple(ids("<Path> NL 1 . 2 :"))
    # Token 38 ("c" in the inner Path 2) sits in outer Path 0 and inner Path 1.
    assert s.chains[38] == ((1, 0), (17, 1))
    assert s.chains[50] == ((1, 1),)
    assert s.block[38] == 17 and s.block[46] == 1 and s.block[59] == -1


def test_back_to_back_blocks_do_not_mask_each_other():
    seq = ids(
        "<Parallel> <Goal> <Outline> 1 : </Outline> <Outline> 2 : </Outline> </Goal> NL "  # 0-11
        "<Path> a </Path> NL <Path> b </Path> NL <Conclusion> c </Conclusion> </Parallel> "  # 12-23
        "<Parallel> <Goal> <Outline> 1 : </Outline> <Outline> 2 : </Outline> </Goal> NL "  # 24-35
        "<Path> d </Path> NL <Path> a </Path> NL <Conclusion> b </Conclusion> </Parallel>"  # 36-47
    )
    s = analyze(seq, TOKENS)
    hidden = [(16, 20, 12, 16), (40, 44, 36, 40)]
    assert np.array_equal(s.dense_mask(), _expected_mask(48, hidden))
    # Block 1: g=10, Paths at 11.., Conclusion at 14; block 2 continues from it.
    assert s.positions[:24].tolist() == list(range(12)) + [11, 12, 13, 14, 11, 12, 13, 14] + [14, 15, 16, 17]
    assert s.positions[24] == 18 and s.positions[34] == 28 and s.positions[36] == 29
    assert s.positions[44] == 32


@pytest.mark.parametrize(
    "text,note",
    [
        ("x </Path> NL a </Parallel> <Path> b", None),  # stray tags, no block
        ("<Parallel> <Goal> </Goal> NL <Path> a </Path> NL <Path> b </Path>", "no labelled Outline"),
        ("<Parallel> <Goal> <Outline> a </Outline> </Goal> <Path> a </Path> NL <Path> b", "no labelled"),
        ("<Parallel> </Goal> <Path> a </Path> NL <Path> b </Path> NL", "no labelled"),
        ("<Parallel> <Goal> <Outline> 1 : </Outline> </Goal> <Conclusion> <Parallel> <Path> a", "outside a Path"),
    ],
)
def test_malformed_is_causal(text, note):
    seq = ids(text)
    s = analyze(seq, TOKENS)
    assert np.array_equal(s.dense_mask(), np.tri(len(seq), dtype=bool))
    assert not [e for e in s.events if e.kind is not EventKind.FORK] or note is None
    if note is None:
        assert s.positions.tolist() == list(range(len(seq)))
    else:
        assert any(note in n.message for n in s.notes)
        assert not [e for e in s.events if e.kind is EventKind.FORK] or "outside" in note


def test_too_many_outlines_and_too_deep_are_causal():
    three = (
        "<Parallel> <Goal> <Outline> 1 : </Outline> <Outline> 2 : </Outline> <Outline> 3 : </Outline> </Goal> "
        "NL <Path> a </Path> NL <Path> b </Path> NL"
    )
    s = analyze(ids(three), TOKENS, StructureConfig(max_outlines=2))
    assert not s.events and not s.spans and "3 Outlines > max_outlines" in s.notes[0].message
    assert s.positions.tolist() == list(range(len(ids(three))))
    # The nested block of NESTED is depth 2: with max_depth=1 it is plain text,
    # while the outer block keeps its rule.
    s = analyze(NESTED, TOKENS, StructureConfig(max_depth=1))
    assert np.array_equal(s.dense_mask(), _expected_mask(60, [(49, 55, 13, 49)]))
    assert [e.depth for e in s.events] == [1, 1, 1]
    assert s.positions[17:47].tolist() == list(range(16, 46))


def test_unclosed_block_at_end_keeps_prefix_structure():
    full = analyze(NESTED, TOKENS)
    cut = analyze(NESTED[:39], TOKENS)  # inside the nested block's second Path
    assert cut.positions.tolist() == full.positions[:39].tolist()
    assert np.array_equal(cut.dense_mask(), full.dense_mask()[:39, :39])
    assert [(sp.start, sp.end) for sp in cut.spans] == [(13, 39), (33, 37), (37, 39)]


def test_tags_in_the_prompt_follow_the_same_rule():
    # A conversation that carries a finished block: nothing special about where
    # a token came from.
    s1 = analyze(WORKED, TOKENS)
    s2 = analyze(ids("a b c") + WORKED, TOKENS)
    assert s2.positions[3:].tolist() == [p + 3 for p in s1.positions.tolist()]


def test_mask_for_4096_tokens_is_fast():
    import time

    seq = (NESTED * 69)[:4096]
    t0 = time.perf_counter()
    s = analyze(seq, TOKENS)
    m = s.dense_mask()
    elapsed = time.perf_counter() - t0
    assert m.shape == (4096, 4096) and not m[49 + 60, 13 + 60]
    assert elapsed < 0.1, f"{elapsed * 1000:.1f} ms"


def test_config_round_trip():
    from vllm_multiverse.structure import MultiverseTokens

    assert MultiverseTokens.from_config(TOKENS.to_config()) == TOKENS
    with pytest.raises(ValueError):
        StructureConfig(positions="sglang")
    assert VOCAB["<Think>"] == TOKENS.think_open
