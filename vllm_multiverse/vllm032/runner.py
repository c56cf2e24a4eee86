"""The model-runner hooks on vLLM 0.32.0's V1 ``GPUModelRunner``, the same
code on CPU (whose runner is its subclass) and on CUDA: the step's written
tokens, the merge's KV copies, Multiverse positions for the scheduled
tokens, the masked rows handed to the attention backend, and no full CUDA
graph for a step that has them. Everything comes from the step's
:class:`~vllm_multiverse.tree.MultiverseStep` (``patches.received_step``).
Model Runner V2's hooks are ``runner_v2.py``; vLLM 0.34 keeps only V2.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vllm.config import CUDAGraphMode
from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher

from vllm_multiverse.kernels.masked_attention import MaskedBatch
from vllm_multiverse.structure import Rect
from vllm_multiverse.tree import MultiverseStep
from vllm_multiverse.vllm032 import patches
from vllm_multiverse.vllm032.runner_base import MultiverseRunnerBase
from vllm_multiverse.vllm032.step_inputs import masked_batch, position_deltas

if TYPE_CHECKING:
    from vllm.forward_context import BatchDescriptor
    from vllm.v1.core.sched.output import SchedulerOutput

_EMPTY = MultiverseStep()


class MultiverseCudagraphDispatcher(CudagraphDispatcher):
    """A full graph replays the attention it captured, which has no mask:
    a step with masked rows runs piecewise (attention eager, in Python) or
    eager. Steps without keep vLLM's choice."""

    masked_step = False

    def dispatch(
        self,
        *args: Any,
        valid_modes: AbstractSet[CUDAGraphMode] | None = None,
        invalid_modes: AbstractSet[CUDAGraphMode] | None = None,
        **kwargs: Any,
    ) -> tuple[CUDAGraphMode, BatchDescriptor]:
        if self.masked_step and (valid_modes is None or set(valid_modes) - {CUDAGraphMode.FULL}):
            invalid_modes = set(invalid_modes or ()) | {CUDAGraphMode.FULL}
        return super().dispatch(*args, valid_modes=valid_modes, invalid_modes=invalid_modes, **kwargs)


class MultiverseRunnerMixin(MultiverseRunnerBase):
    # The step being prepared; vLLM's dummy runs (profiling, CUDA graph
    # capture) have none.
    _mv_step = _EMPTY

    def _multiverse_after_load(self) -> None:
        super()._multiverse_after_load()
        patches.use_dispatcher_class(self, MultiverseCudagraphDispatcher)

    def _update_states(self, scheduler_output: SchedulerOutput) -> Callable | None:
        step = self.multiverse_step(scheduler_output)
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
        self.cudagraph_dispatcher.masked_step = bool(step.masks)
        self._mv_step = step
        return ret

    def _prepare_inputs(self, scheduler_output: SchedulerOutput, num_scheduled_tokens: np.ndarray) -> Any:
        ret = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        if not self._mv_step.positions:
            return ret
        # The slot mapping was computed from the token indices; RoPE gets the
        # Multiverse positions: one host-to-device copy for the batch.
        num_reqs = self.input_batch.num_reqs
        delta = position_deltas(
            self._mv_step.positions,
            self.input_batch.req_ids,
            self.query_start_loc.np[: num_reqs + 1],
            self.optimistic_seq_lens_cpu.numpy()[:num_reqs],
            int(num_scheduled_tokens.sum()),
        )
        if delta is not None:
            d = torch.from_numpy(delta)
            if self.positions.is_cuda:
                d = d.pin_memory().to(self.positions.device, non_blocking=True)
            self.positions[: len(delta)] -= d
        return ret

    def _masked_batch(self, masks: Mapping[str, list[Rect]]) -> MaskedBatch:
        table = self.input_batch.block_table[0]
        return masked_batch(
            masks,
            self.input_batch.req_ids,
            self.query_start_loc.np,
            self.optimistic_seq_lens_cpu.numpy(),
            lambda i, n: table.block_table.np[i, :n],
            table.block_size,
            self._kernel_block_sizes[0],
        )

    def _build_attention_metadata(self, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        attn_metadata, spec = super()._build_attention_metadata(*args, **kwargs)
        masks = self._mv_step.masks
        self._mv_step = _EMPTY
        if masks and attn_metadata:
            batch = self._masked_batch(masks)
            # One metadata object serves every layer of a KV cache group.
            for md in {id(m): m for m in attn_metadata.values()}.values():
                patches.attach_masked_batch(md, batch)
        return attn_metadata, spec
