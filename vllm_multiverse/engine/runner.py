"""The model-runner hooks (vLLM 0.32.0's V1 ``CPUModelRunner``): Multiverse
positions for scheduled tokens, and the merge's KV copies."""

from __future__ import annotations

import torch
from vllm.v1.worker.cpu_model_runner import CPUModelRunner

from vllm_multiverse.engine.kv_copy import copy_token_slots


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
        # After vLLM's own block zeroing and copy-on-write, before the forward.
        copies = getattr(scheduler_output, "mv_kv_copies", None)
        if copies:
            copy_token_slots(self.kv_caches, copies, self.cache_config.block_size)
        return ret

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        ret = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
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


class MultiverseCPUModelRunner(MultiverseRunnerMixin, CPUModelRunner):
    pass
