"""A word-level toy vocabulary for hand-written structure examples."""

from vllm_multiverse.structure import TAG_NAMES, MultiverseTokens

WORDS = ("\n", "x", "y", "z", "o1", "o2", "o3", "1", "2", "3", ".", ":", "a", "b", "c", "d")
VOCAB = {w: i for i, w in enumerate(TAG_NAMES + WORDS)}
ID_TO_WORD = {i: w for w, i in VOCAB.items()}

TOKENS = MultiverseTokens.from_config(
    {
        **{k: VOCAB[t] for k, t in zip(
            ("think_open", "think_close", "parallel_open", "parallel_close",
             "goal_open", "goal_close", "outline_open", "outline_close",
             "path_open", "path_close", "conclusion_open", "conclusion_close"),
            TAG_NAMES)},
        "path_header_lead": [VOCAB["\n"]],
        "path_header_mid": [VOCAB["\n"]],
        "conclusion_header": [VOCAB["<Conclusion>"], VOCAB["\n"]],
        # "o1"/"o2"/"o3" stand for whole labels, as in the worked example.
        "label_char_ids": [VOCAB[c] for c in "123."],
        "label_end_ids": [VOCAB[c] for c in (":", "o1", "o2", "o3")],
        "space_ids": [VOCAB["\n"]],
    }
)


def ids(text: str) -> list[int]:
    """Space-separated words to ids; "\\n" written as NL."""
    return [VOCAB["\n" if w == "NL" else w] for w in text.split()]
