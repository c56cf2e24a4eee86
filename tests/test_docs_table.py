"""docs/structure.md's worked-example table is what the module computes."""

from pathlib import Path

from toy_vocab import TOKENS, VOCAB

from vllm_multiverse.structure import StructureConfig, analyze

DOC = Path(__file__).resolve().parents[1] / "docs" / "structure.md"


def _rows():
    rows = []
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0].isdigit():
            rows.append(cells)
    return rows


def test_table_matches_module():
    rows = _rows()
    assert len(rows) == 35
    seq = [VOCAB["\n" if c[1] == "`\\n`" else c[1].strip("`")] for c in rows]
    train = analyze(seq, TOKENS)
    engine = analyze(seq, TOKENS, StructureConfig(positions="engine"))
    for i, (idx, _, tpos, epos, _part, sees) in enumerate(rows):
        assert int(idx) == i
        assert train.positions[i] == int(tpos), i
        assert engine.positions[i] == int(epos), i
        ranges = []
        for r in sees.split(", "):
            a, _, b = r.partition("-")
            ranges.append((int(a), int(b or a) + 1))
        assert train.visible_ranges(i) == ranges, i
