"""The token ids a Multiverse model writes its structure with.

Everything here is token ids: the engine reads structure without decoding
text. A model declares these ids in its ``config.json`` under
``"multiverse"`` (see :meth:`MultiverseTokens.to_config`); for a model that
does not, :meth:`MultiverseTokens.from_tokenizer` derives them from the
tokenizer and the authors' tag names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

TAG_NAMES: tuple[str, ...] = (
    "<Think>", "</Think>", "<Parallel>", "</Parallel>", "<Goal>", "</Goal>",
    "<Outline>", "</Outline>", "<Path>", "</Path>", "<Conclusion>",
    "</Conclusion>",
)
# The authors' engine writes exactly these (Multiverse-32B); the label goes
# where "{label}" stands and already ends with its ":".
DEFAULT_PATH_HEADER = "\n<Path>\n{label}"
DEFAULT_CONCLUSION_HEADER = "<Conclusion>\n"
LABEL_END = ":"
# What an Outline's label is made of, token by token, whatever the tokenizer
# merges: digits and dots ("1", "12", "2.1", "1.2.3"), then a token that
# holds the ":" (alone, or with what follows it: ":\n", ":**", " :").
_LABEL_CHARS = re.compile(r"[0-9]+|\.")
_LABEL_END = re.compile(r"([0-9.]*)\s*:")
# Raw vocabulary pieces worth decoding: digits, dots and whitespace only
# (byte-level and sentencepiece spell whitespace as these), or up to a ":".
_CANDIDATE = re.compile(r"[0-9.\s\u0120\u010a\u0109\u010d\u2581]*(?::|$)")


@dataclass(frozen=True)
class MultiverseTokens:
    """Tag ids and engine-written headers of one Multiverse tokenizer."""

    think_open: int
    think_close: int
    parallel_open: int
    parallel_close: int
    goal_open: int
    goal_close: int
    outline_open: int
    outline_close: int
    path_open: int
    path_close: int
    conclusion_open: int
    conclusion_close: int
    # Path header = lead + [<Path>] + mid + label ids (label ends with ":").
    # The lead ("\n") is shared by all Paths: the sequential layer writes it
    # once, before the first Path only.
    path_header_lead: tuple[int, ...]
    path_header_mid: tuple[int, ...]
    conclusion_header: tuple[int, ...]
    # An Outline's label: optional whitespace tokens, then label-char tokens
    # (digits and "."), optional whitespace, then a label-end token (one
    # holding the ":").
    label_char_ids: frozenset[int]
    label_end_ids: frozenset[int]
    space_ids: frozenset[int] = field(default_factory=frozenset)
    # A label-end token that holds more than its label's ":" (":\n", " :",
    # ":**"), or label chars too ("1:"), -> the tokens of just its label
    # part and ":": the header the engine writes is what the model was
    # trained to see at the start of a Path ("1: ..." -> "1", ":").
    label_end_canonical: Mapping[int, tuple[int, ...]] = field(default_factory=dict)

    def label(self, chars: tuple[int, ...], end: int) -> tuple[int, ...]:
        """The label tokens a Path header carries, for an Outline's label."""
        return (*chars, *self.label_end_canonical.get(end, (end,)))

    def path_header(self, label: tuple[int, ...], first: bool = True) -> tuple[int, ...]:
        lead = self.path_header_lead if first else ()
        return lead + (self.path_open,) + self.path_header_mid + label

    # Config round trip (lists, not sets, so that it is JSON).
    def to_config(self) -> dict[str, Any]:
        cfg = asdict(self)
        for key in _SET_FIELDS:
            cfg[key] = sorted(cfg[key])
        for key in ("path_header_lead", "path_header_mid", "conclusion_header"):
            cfg[key] = list(cfg[key])
        cfg["label_end_canonical"] = {str(k): list(v) for k, v in sorted(self.label_end_canonical.items())}
        return cfg

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> MultiverseTokens:
        kw = dict(cfg)
        for key in _SET_FIELDS:
            kw[key] = frozenset(kw.get(key, ()))
        for key in ("path_header_lead", "path_header_mid", "conclusion_header"):
            kw[key] = tuple(kw[key])
        kw["label_end_canonical"] = {int(k): tuple(v) for k, v in kw.get("label_end_canonical", {}).items()}
        return cls(**kw)

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer: Any,
        path_header: str = DEFAULT_PATH_HEADER,
        conclusion_header: str = DEFAULT_CONCLUSION_HEADER,
    ) -> MultiverseTokens:
        """Derive the ids from a Hugging Face tokenizer holding the twelve tags."""
        vocab = tokenizer.get_vocab()
        missing = [t for t in TAG_NAMES if t not in vocab]
        if missing:
            raise ValueError(f"tokenizer lacks the Multiverse tags {missing}")

        def encode(text: str) -> tuple[int, ...]:
            return tuple(tokenizer.encode(text, add_special_tokens=False))

        if "{label}" not in path_header or "<Path>" not in path_header:
            raise ValueError(f"path header {path_header!r} needs <Path> and {{label}}")
        lead_text, rest = path_header.split("<Path>", 1)
        mid_text, _ = rest.split("{label}", 1)
        chars, ends, spaces = _label_tokens(tokenizer)
        if not ends:
            raise ValueError(f"no token of this tokenizer holds a label's {LABEL_END!r}")
        canonical = {}
        for tok, prefix in ends.items():
            want = encode(prefix + LABEL_END)
            if want != (tok,):
                canonical[tok] = want
        return cls(
            **{_attr(t): vocab[t] for t in TAG_NAMES},
            path_header_lead=encode(lead_text) if lead_text else (),
            path_header_mid=encode(mid_text) if mid_text else (),
            conclusion_header=encode(conclusion_header),
            label_char_ids=frozenset(chars),
            label_end_ids=frozenset(ends),
            space_ids=frozenset(spaces),
            label_end_canonical=canonical,
        )


_SET_FIELDS = ("label_char_ids", "label_end_ids", "space_ids")


def _attr(tag: str) -> str:
    name = tag.strip("<>/").lower()
    return f"{name}_close" if tag.startswith("</") else f"{name}_open"


def _label_tokens(tokenizer: Any) -> tuple[list[int], dict[int, str], list[int]]:
    """Label-char, label-end (-> its label chars before the ":") and
    whitespace tokens, read off the whole vocabulary."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    ids = [i for i, p in enumerate(pieces) if p is not None and _CANDIDATE.match(p)]
    texts = tokenizer.batch_decode([[i] for i in ids])
    special = set(getattr(tokenizer, "all_special_ids", ()))
    chars, ends, spaces = [], {}, []
    for i, text in zip(ids, texts):
        if i in special or not text:
            continue
        if _LABEL_CHARS.fullmatch(text):
            chars.append(i)
        elif (m := _LABEL_END.match(text)) is not None:
            ends[i] = m.group(1)
        elif text.isspace():
            spaces.append(i)
    return chars, ends, spaces
