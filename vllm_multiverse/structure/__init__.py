"""The Multiverse structure of a token sequence: the project's ground truth.

One rule (:mod:`.state`), in an incremental form for decoding and a batch
form (:mod:`.analysis`) for training, reference decoding and masked prefill.
"""

from vllm_multiverse.structure.analysis import Span, Structure, analyze
from vllm_multiverse.structure.incremental import (
    Event,
    EventKind,
    Note,
    Part,
    PositionConvention,
    StructureConfig,
    StructureState,
)
from vllm_multiverse.structure.tokens import TAG_NAMES, MultiverseTokens

__all__ = [
    "TAG_NAMES",
    "Event",
    "EventKind",
    "MultiverseTokens",
    "Note",
    "Part",
    "PositionConvention",
    "Span",
    "Structure",
    "StructureConfig",
    "StructureState",
    "analyze",
]
