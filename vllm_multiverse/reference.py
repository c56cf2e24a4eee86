"""Sequential Multiverse decoding in plain PyTorch + transformers (layer 1).

The definition of the right answer: one sequence, the Paths one after
another, the Multiverse mask and positions from the structure module applied
on every step, and the control tokens written exactly where the structure
module's events say. Every vLLM-side test compares against this.

Each step feeds the new token over the cached KV of the earlier ones with
that token's mask row; ``recompute=True`` instead re-runs the whole sequence
with the dense mask every step (slow, and the check that the cached form is
right).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vllm_multiverse.structure import MultiverseTokens, StructureConfig, StructureState, analyze


@dataclass
class ReferenceOutput:
    token_ids: list[int] = field(default_factory=list)  # output tokens, text order
    written: list[bool] = field(default_factory=list)  # True where the engine wrote it
    logprobs: list[float | None] = field(default_factory=list)  # None for written tokens
    finish_reason: str = "length"  # "stop" (EOS / stop token) or "length"


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[q, k] bool -> [1, 1, q, k] additive float mask (0 / dtype min)."""
    # transformers reads a float 4-D mask as-is; a bool one is not reliable
    # across versions.
    out = torch.zeros(allowed.shape, dtype=dtype)
    out.masked_fill_(~allowed, torch.finfo(dtype).min)
    return out[None, None]


class ReferenceDecoder:
    def __init__(
        self,
        model: torch.nn.Module,
        tokens: MultiverseTokens,
        config: StructureConfig | None = None,
        eos_token_ids: Sequence[int] = (),
    ) -> None:
        self.model = model.eval()
        self.tokens = tokens
        self.config = config or StructureConfig()
        self.eos_token_ids = frozenset(eos_token_ids)

    @classmethod
    def from_pretrained(cls, path: str | Path, config: StructureConfig | None = None) -> ReferenceDecoder:
        from transformers import AutoModelForCausalLM

        from vllm_multiverse.model_config import model_declaration, read_model_declaration

        path = Path(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        # As the engine reads it: config.json's declaration, else the tokenizer's.
        entry = model_declaration(path)
        if entry is None:
            raise ValueError(f"{path} is not a Multiverse model (no declaration, no Multiverse tags)")
        info = read_model_declaration({"multiverse": entry})
        config = config or StructureConfig(positions=info.positions)
        eos = model.generation_config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos]
        return cls(model, info.tokens, config, eos_ids)

    def forward_logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Logits [n, vocab] of a whole sequence under the Multiverse rule."""
        s = analyze(token_ids, self.tokens, self.config)
        dtype = next(self.model.parameters()).dtype
        out = self.model(
            input_ids=torch.tensor([list(token_ids)]),
            position_ids=torch.from_numpy(s.positions)[None],
            attention_mask=additive_mask(torch.from_numpy(s.dense_mask()), dtype),
        )
        return out.logits[0].float()

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Sequence[int],
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        recompute: bool = False,
    ) -> ReferenceOutput:
        if not prompt_ids:
            raise ValueError("prompt_ids must not be empty")
        stops = frozenset(stop_token_ids) | (frozenset() if ignore_eos else self.eos_token_ids)
        gen = None
        if seed is not None:
            gen = torch.Generator().manual_seed(seed)
        state = StructureState(self.tokens, self.config)
        seq: list[int] = []
        step = _Stepper(self, recompute)
        out = ReferenceOutput()
        queue: list[int] = []
        for tok in prompt_ids:
            ev = state.append(tok)
            step.add(state)
            seq.append(tok)
        if ev is not None:  # a prompt ending right where the engine acts
            queue.extend(ev.write)
        while len(out.token_ids) < max_tokens:
            logprob = None
            if queue:
                tok = queue.pop(0)
            else:
                logits = step.logits(seq)
                tok = _sample(logits, temperature, top_p, top_k, gen)
                logprob = torch.log_softmax(logits, dim=-1)[tok].item()
            out.token_ids.append(tok)
            out.written.append(logprob is None)
            out.logprobs.append(logprob)
            if logprob is not None and tok in stops:
                out.finish_reason = "stop"
                break
            ev = state.append(tok)
            step.add(state)
            seq.append(tok)
            if ev is not None:
                queue.extend(ev.write)
        return out


class _Stepper:
    """Logits of the last token: cached KV with mask rows, or full recompute."""

    def __init__(self, dec: ReferenceDecoder, recompute: bool) -> None:
        self.dec = dec
        self.recompute = recompute
        self.dtype = next(dec.model.parameters()).dtype
        self.cache = None
        self.fed = 0  # tokens whose KV is in the cache
        self.positions: list[int] = []
        self.hidden: list[list[tuple[int, int]]] = []

    def add(self, state: StructureState) -> None:
        self.positions.append(state.position)
        self.hidden.append(state.hidden_ranges())

    def logits(self, seq: list[int]) -> torch.Tensor:
        if self.recompute:
            return self.dec.forward_logits(seq)[-1]
        from transformers import DynamicCache

        if self.cache is None:
            self.cache = DynamicCache()
        n = len(seq)
        new = range(self.fed, n)
        allowed = torch.zeros((len(new), n), dtype=torch.bool)
        for r, q in enumerate(new):
            allowed[r, : q + 1] = True
            for k0, k1 in self.hidden[q]:
                allowed[r, k0:k1] = False
        out = self.dec.model(
            input_ids=torch.tensor([seq[self.fed :]]),
            position_ids=torch.tensor([self.positions[self.fed :]]),
            attention_mask=additive_mask(allowed, self.dtype),
            past_key_values=self.cache,
            use_cache=True,
        )
        self.fed = n
        return out.logits[0, -1].float()


def _sample(
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    top_k: int,
    gen: torch.Generator | None,
) -> int:
    if temperature <= 0.0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p
        logits = logits.masked_fill(drop.scatter(0, idx, drop), float("-inf"))
    probs = logits.softmax(-1)
    # The exponential race vLLM's sampler uses: argmax(p / q), q ~ Exp(1).
    q = torch.empty_like(probs).exponential_(generator=gen)
    return int((probs / q).argmax())
