"""The Multiverse structure of a token sequence: the project's ground truth.

One rule, in an incremental form (:mod:`.incremental`) for decoding and a batch
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
from vllm_multiverse.structure.masks import Hidden, Rect
from vllm_multiverse.structure.tokens import TAG_NAMES, MultiverseTokens

__all__ = [
    "TAG_NAMES",
    "Event",
    "EventKind",
    "Hidden",
    "MultiverseTokens",
    "Note",
    "Part",
    "PositionConvention",
    "Rect",
    "Span",
    "Structure",
    "StructureConfig",
    "StructureState",
    "analyze",
]
