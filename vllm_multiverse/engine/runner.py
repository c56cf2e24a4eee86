"""The model-runner hooks (vLLM 0.32.0's V1 ``CPUModelRunner``): Multiverse
positions for scheduled tokens, the merge's KV copies, and the step's masks
handed to the attention backend."""

from __future__ import annotations

import torch
from vllm.v1.worker.cpu_model_runner import CPUModelRunner

from vllm_multiverse.engine.attn_mask import allowed_rows
from vllm_multiverse.engine.kv_layout import copy_token_slots


class MultiverseRunnerMixin:
    def _update_states(self, scheduler_output):
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
        for rid, (start, tokens) in (getattr(scheduler_output, "mv_token_fixes", None) or {}).items():
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
        copies = getattr(scheduler_output, "mv_kv_copies", None)
        if copies:
            copy_token_slots(self.kv_caches, copies, self.cache_config.block_size)
        return ret

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        ret = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        # _build_attention_metadata, next, does not get the scheduler output.
        self._mv_attn_masks = getattr(scheduler_output, "mv_attn_masks", None)
        # Slot mapping used the token index; RoPE gets the Multiverse position.
        positions = getattr(scheduler_output, "mv_positions", None)
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
        masks, self._mv_attn_masks = getattr(self, "_mv_attn_masks", None), None
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
                md.mv_masks = rows
        return attn_metadata, spec


class MultiverseCPUModelRunner(MultiverseRunnerMixin, CPUModelRunner):
    pass
