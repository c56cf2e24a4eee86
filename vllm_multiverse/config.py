"""Multiverse engine options: ``additional_config["multiverse"]`` in vLLM."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from vllm_multiverse.structure import PositionConvention, StructureConfig

ADDITIONAL_CONFIG_KEY = "multiverse"

MaskedAttention = Literal["auto", "flashinfer", "sdpa"]


@dataclass(frozen=True)
class MultiverseConfig:
    # None: on for models that declare themselves Multiverse models.
    enabled: bool | None = None
    # None: the convention the model declares (else "training").
    positions: PositionConvention | None = None
    # Beyond these caps a block still decodes correctly, its Paths run one
    # after another as branches (a counted fallback).
    max_paths_per_fork: int = 16
    max_depth: int = 4
    max_branches_per_request: int = 64
    # False: every block's Paths one after another as branches (a baseline
    # for benchmarks).
    parallel: bool = True
    # True: no fork at all; the Paths one after another in the one sequence,
    # masked, the engine writing the control tokens (per request:
    # SamplingParams(extra_args={"multiverse_sequential": True})).
    sequential: bool = False
    # vLLM's enable_prefix_caching as the user set it. Branches share blocks
    # through vLLM's prefix-cache machinery, so that stays on; off here means
    # no request reads the cache.
    prefix_caching: bool = True
    # The structure rule's own limits (malformed beyond them: causal text).
    max_outlines: int = StructureConfig.max_outlines
    max_nesting: int = StructureConfig.max_depth
    # How a step with masked rows is computed on CUDA: FlashInfer's masked
    # paged prefill (the whole step), or SDPA over the gathered K/V (the
    # masked rows, after vLLM's kernel); "auto": FlashInfer where it is
    # installed and its module builds while the model loads, else SDPA
    # ("flashinfer" refuses to start instead). On CPU: the CPU kernel, or SDPA.
    masked_attention: MaskedAttention = "auto"

    def __post_init__(self) -> None:
        for name in ("max_paths_per_fork", "max_depth", "max_branches_per_request"):
            if getattr(self, name) < 1:
                raise ValueError(f"multiverse option {name} must be at least 1")

    def structure_config(self, declared: PositionConvention | None) -> StructureConfig:
        return StructureConfig(
            positions=self.positions or declared or "training",
            max_depth=self.max_nesting,
            max_outlines=self.max_outlines,
        )

    @classmethod
    def of(cls, vllm_config: Any) -> MultiverseConfig:
        """The options of a vLLM engine config (its ``additional_config``)."""
        return cls.from_dict(raw_options(vllm_config))

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> MultiverseConfig:
        raw = dict(raw or {})
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown multiverse options {sorted(unknown)}; known: {sorted(known)}")
        return cls(**raw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def raw_options(vllm_config: Any) -> dict[str, Any]:
    """``additional_config["multiverse"]`` of a vLLM engine config, as given."""
    return (vllm_config.additional_config or {}).get(ADDITIONAL_CONFIG_KEY) or {}


def turned_on(vllm_config: Any) -> bool:
    """Whether start-up turned Multiverse decoding on for this engine (it
    stores ``enabled=True``; the API server, the stat logger and the
    per-request checks read it)."""
    return raw_options(vllm_config).get("enabled") is True
