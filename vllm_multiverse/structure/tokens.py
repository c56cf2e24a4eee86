"""The token ids a Multiverse model writes its structure with.

Everything here is token ids: the engine reads structure without decoding
text. A model declares these ids in its ``config.json`` under
``"multiverse"`` (see :meth:`MultiverseTokens.to_config`); for a model that
does not, :meth:`MultiverseTokens.from_tokenizer` derives them from the
tokenizer and the authors' tag names.
"""

from __future__ import annotations

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
LABEL_CHARS = "0123456789."
LABEL_END = ":"


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
    # (digits and "."), then a label-end token (":"; a tokenizer that merges
    # "1:" into one token lists that token here too).
    label_char_ids: frozenset[int]
    label_end_ids: frozenset[int]
    space_ids: frozenset[int] = field(default_factory=frozenset)

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
        return cfg

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> MultiverseTokens:
        kw = dict(cfg)
        for key in _SET_FIELDS:
            kw[key] = frozenset(kw.get(key, ()))
        for key in ("path_header_lead", "path_header_mid", "conclusion_header"):
            kw[key] = tuple(kw[key])
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
        single = _single_ids(encode, LABEL_CHARS)
        label_end = _single_ids(encode, LABEL_END)
        if not label_end:
            raise ValueError(f"{LABEL_END!r} is not a single token in this tokenizer")
        spaces = _single_ids(encode, " \n\t")
        return cls(
            **{_attr(t): vocab[t] for t in TAG_NAMES},
            path_header_lead=encode(lead_text) if lead_text else (),
            path_header_mid=encode(mid_text) if mid_text else (),
            conclusion_header=encode(conclusion_header),
            label_char_ids=frozenset(single),
            label_end_ids=frozenset(label_end),
            space_ids=frozenset(spaces),
        )


_SET_FIELDS = ("label_char_ids", "label_end_ids", "space_ids")


def _attr(tag: str) -> str:
    name = tag.strip("<>/").lower()
    return f"{name}_close" if tag.startswith("</") else f"{name}_open"


def _single_ids(encode, chars: str) -> list[int]:
    """Ids of the characters that the tokenizer keeps as one token each."""
    out = []
    for ch in chars:
        ids = encode(ch)
        if len(ids) == 1:
            out.append(ids[0])
    return out
