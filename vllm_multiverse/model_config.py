"""How a model declares itself a Multiverse model.

The declaration holds the tag token ids, the engine-written headers (as text
and as ids) and the position convention, so the plugin reads the model's
structure without guessing. It comes, first found first:

1. ``config.json["multiverse"]`` (or ``--hf-overrides '{"multiverse": ...}'``,
   which vLLM sets on the same config);
2. derived from the tokenizer: a model whose tokenizer holds all twelve
   Multiverse tags as single special tokens (the authors' published
   checkpoints declare nothing) gets the authors' engine-written headers and
   :data:`UNDECLARED_POSITIONS`. ``vllm-multiverse declare MODEL_DIR`` prints
   that declaration, ``--write`` stores it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_multiverse.structure import TAG_NAMES, MultiverseTokens, PositionConvention
from vllm_multiverse.structure.tokens import DEFAULT_CONCLUSION_HEADER, DEFAULT_PATH_HEADER

CONFIG_KEY = "multiverse"
FORMAT_VERSION = 1
# A checkpoint that declares nothing was made for the authors' engine, and its
# published results were measured there: serve it with that engine's positions
# (docs/structure.md, "Which convention a checkpoint gets").
UNDECLARED_POSITIONS: PositionConvention = "engine"


@dataclass(frozen=True)
class ModelDeclaration:
    tokens: MultiverseTokens
    positions: PositionConvention


class PartialTags(ValueError):
    """A tokenizer that holds some of the Multiverse tags, not all."""


def declaration(
    tokens: MultiverseTokens,
    positions: PositionConvention,
    path_header: str = DEFAULT_PATH_HEADER,
    conclusion_header: str = DEFAULT_CONCLUSION_HEADER,
) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "positions": positions,
        "path_header": path_header,
        "conclusion_header": conclusion_header,
        "tokens": tokens.to_config(),
    }


def derive_declaration(tokenizer: Any, positions: PositionConvention = UNDECLARED_POSITIONS) -> dict[str, Any] | None:
    """The declaration a tokenizer holding the twelve tags as single special
    tokens implies; None if it holds none of them."""
    special = set(tokenizer.all_special_tokens) | {
        t.content for t in tokenizer.added_tokens_decoder.values() if t.special
    }
    present = [t for t in TAG_NAMES if t in special]
    if not present:
        return None
    if len(present) < len(TAG_NAMES):
        missing = [t for t in TAG_NAMES if t not in special]
        raise PartialTags(f"the tokenizer holds some Multiverse tags as special tokens but not {missing}")
    return declaration(MultiverseTokens.from_tokenizer(tokenizer), positions)


def write_multiverse_config(model_dir: str | Path, entry: dict[str, Any]) -> None:
    path = Path(model_dir) / "config.json"
    cfg = json.loads(path.read_text())
    cfg[CONFIG_KEY] = entry
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def read_model_declaration(config: dict[str, Any] | Any) -> ModelDeclaration | None:
    """The declaration in a config (a dict or a transformers config), if any."""
    entry = config.get(CONFIG_KEY) if isinstance(config, dict) else getattr(config, CONFIG_KEY, None)
    if not entry:
        return None
    if entry.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"unsupported multiverse config format {entry.get('format_version')!r}")
    return ModelDeclaration(tokens=MultiverseTokens.from_config(entry["tokens"]), positions=entry["positions"])


def model_declaration(model_dir: str | Path) -> dict[str, Any] | None:
    """A checkpoint directory's declaration: its config.json entry, else the
    one its tokenizer implies."""
    from transformers import AutoTokenizer

    entry = json.loads((Path(model_dir) / "config.json").read_text()).get(CONFIG_KEY)
    return entry or derive_declaration(AutoTokenizer.from_pretrained(model_dir))


def describe(entry: dict[str, Any]) -> str:
    """One line for the log: what the engine reads the structure with."""
    t = entry["tokens"]
    return (
        f"tags {t['think_open']}..{t['conclusion_close']} (</Goal> {t['goal_close']}, </Path> {t['path_close']}), "
        f"Path header {entry['path_header']!r}, Conclusion header {entry['conclusion_header']!r}, "
        f"positions {entry['positions']!r}"
    )
