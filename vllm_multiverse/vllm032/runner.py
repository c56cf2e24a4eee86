"""The model-runner hooks on vLLM 0.32.0's V1 ``GPUModelRunner`` (the CPU
runner is its subclass): the step's written tokens, the merge's KV copies,
Multiverse positions for the scheduled tokens, and the masks handed to the
attention backend. Everything comes from the step's
:class:`~vllm_multiverse.tree.MultiverseStep` (``SchedulerOutput.multiverse``).
"""

from __future__ import annotations

import torch

from vllm_multiverse.tree import MultiverseStep
from vllm_multiverse.tree.masks import Rect

_EMPTY = MultiverseStep()


def allowed_rows(rects: list[Rect], start: int, end: int) -> torch.Tensor:
    """Boolean [end - start, end]: query row r (token start + r) may see key k."""
    q = torch.arange(start, end).unsqueeze(1)
    allowed = torch.arange(end).unsqueeze(0) <= q
    for q0, q1, k0, k1 in rects:
        allowed[max(q0, start) - start : max(0, min(q1, end) - start), k0:k1] = False
    return allowed


def check_attention_layers(vllm_config) -> None:
    """What start-up could only guess from the model's config, read off the
    built attention layers: nothing the masked path lacks."""
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention import Attention

    from vllm_multiverse.vllm032.validate import refuse

    for name, layer in get_layers_from_vllm_config(vllm_config, Attention).items():
        impl = layer.impl
        if getattr(impl, "alibi_slopes", None) is not None:
            refuse("ALiBi attention", f"layer {name} uses it.")
        if getattr(impl, "sinks", None) is not None:
            refuse("attention sinks", f"layer {name} uses them.")
        if getattr(impl, "logits_soft_cap", None):
            refuse("attention logit soft-capping", f"layer {name} uses it.")
        if getattr(impl, "sliding_window", None) not in (None, -1, (-1, -1)):
            refuse("sliding-window attention", f"layer {name} uses it.")


class MultiverseRunnerMixin:
    # Set by the subclass for its platform: (kv_caches, copies) -> None.
    copy_kv_slots = None

    def load_model(self, *args, **kwargs):
        super().load_model(*args, **kwargs)
        check_attention_layers(self.vllm_config)

    def _update_states(self, scheduler_output):
        step: MultiverseStep = getattr(scheduler_output, "multiverse", _EMPTY)
        cached = scheduler_output.scheduled_cached_reqs
        # A merged parent resumes with tokens the runner has not seen (the
        # Paths and the Conclusion header); the sync V1 runner would keep its
        # stale copy.
        for rid in cached.resumed_req_ids:
            tokens = cached.all_token_ids.get(rid)
            state = self.requests.get(rid)
            if tokens is not None and state is not None:
                state.output_token_ids = list(tokens[len(state.prompt_token_ids) :])
        ret = super()._update_states(scheduler_output)
        # Tokens the engine wrote (the sequential layer's headers) replace
        # what this runner appended on its own (a sampled token the engine
        # dropped, or nothing).
        batch = self.input_batch
        for rid, (start, tokens) in step.token_fixes.items():
            state = self.requests[rid]
            out = state.output_token_ids  # the batch holds this same list
            del out[start - len(state.prompt_token_ids) :]
            out.extend(tokens)
            i = batch.req_id_to_index.get(rid)
            if i is not None:
                end = start + len(tokens)
                batch.token_ids_cpu[i, start:end] = tokens
                batch.is_token_ids[i, start:end] = True
                batch.num_tokens_no_spec[i] = end
        # After vLLM's own block zeroing and copy-on-write, before the forward.
        if step.kv_copies:
            type(self).copy_kv_slots(self.kv_caches, step.kv_copies)
        self._mv_step = step
        return ret

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        ret = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        # Slot mapping used the token index; RoPE gets the Multiverse position.
        positions = self._mv_step.positions
        if positions:
            qsl = self.query_start_loc.np
            for i, rid in enumerate(self.input_batch.req_ids):
                pos = positions.get(rid)
                if pos is None:
                    continue
                a, b = int(qsl[i]), int(qsl[i + 1])
                if isinstance(pos, int):
                    self.positions[a:b] -= pos
                else:
                    self.positions[a:b] = torch.tensor(pos, dtype=self.positions.dtype)
        return ret

    def _build_attention_metadata(self, *args, **kwargs):
        attn_metadata, spec = super()._build_attention_metadata(*args, **kwargs)
        masks = self._mv_step.masks
        self._mv_step = _EMPTY
        if masks and attn_metadata:
            qsl = self.query_start_loc.np
            rows = {}
            for i, rid in enumerate(self.input_batch.req_ids):
                rects = masks.get(rid)
                if rects is None:
                    continue
                q_len = int(qsl[i + 1] - qsl[i])
                end = int(self.seq_lens[i])
                rows[i] = allowed_rows(rects, end - q_len, end)
            # One metadata object serves every layer of a KV cache group.
            for md in {id(m): m for m in attn_metadata.values()}.values():
                md.multiverse_masks = rows
        return attn_metadata, spec
