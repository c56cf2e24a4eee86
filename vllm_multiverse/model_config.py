"""How a model declares itself a Multiverse model: ``config.json["multiverse"]``.

The entry holds the tag token ids, the engine-written headers (as text and as
ids) and the position convention the model was trained with, so the plugin
recognises a Multiverse model and reads its structure without guessing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_multiverse.structure import MultiverseTokens, PositionConvention
from vllm_multiverse.structure.tokens import DEFAULT_CONCLUSION_HEADER, DEFAULT_PATH_HEADER

CONFIG_KEY = "multiverse"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class MultiverseModelInfo:
    tokens: MultiverseTokens
    positions: PositionConvention
    path_header: str
    conclusion_header: str


def write_multiverse_config(
    model_dir: str | Path,
    tokens: MultiverseTokens,
    positions: PositionConvention = "training",
    path_header: str = DEFAULT_PATH_HEADER,
    conclusion_header: str = DEFAULT_CONCLUSION_HEADER,
) -> None:
    path = Path(model_dir) / "config.json"
    cfg = json.loads(path.read_text())
    cfg[CONFIG_KEY] = {
        "format_version": FORMAT_VERSION,
        "positions": positions,
        "path_header": path_header,
        "conclusion_header": conclusion_header,
        "tokens": tokens.to_config(),
    }
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def read_multiverse_config(config: dict[str, Any] | Any) -> MultiverseModelInfo | None:
    """The declaration in a config (a dict or a transformers config), if any."""
    entry = config.get(CONFIG_KEY) if isinstance(config, dict) else getattr(config, CONFIG_KEY, None)
    if not entry:
        return None
    if entry.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"unsupported multiverse config format {entry.get('format_version')!r}")
    return MultiverseModelInfo(
        tokens=MultiverseTokens.from_config(entry["tokens"]),
        positions=entry["positions"],
        path_header=entry["path_header"],
        conclusion_header=entry["conclusion_header"],
    )
