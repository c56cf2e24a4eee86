"""The model-runner hooks on vLLM 0.32.0's Model Runner V2
(``vllm/v1/worker/gpu/model_runner.py``), the same code on CPU (whose V2
runner, ``vllm/v1/worker/cpu/model_runner.py``, is its subclass) and on CUDA.
The runner vLLM keeps from 0.34 on; ``runner.py`` holds the V1 hooks.

Where each hook sits, in the order of ``GPUModelRunner.execute_model``:

- ``update_requests``: after vLLM's own (new block ids, zeroed blocks,
  block-granular copies), the tokens the engine wrote and the scheduler's
  computed counts go into the request states, then the merge's token-slot
  KV copies run;
- the model state's ``prepare_attn``: the masked rows beside vLLM's
  attention metadata;
- the model state's ``prepare_inputs``: Multiverse positions for the model,
  as M-RoPE supplies its own (the slot mapping, the sampler's seeds and
  everything else keep vLLM's token indices);
- the CUDA-graph manager's ``dispatch``: no full graph for a masked step.

Everything comes from the step's :class:`~vllm_multiverse.tree.MultiverseStep`
(``patches.received_step``). Resumed requests (a merged parent among them)
arrive as new ones with their whole text in ``prefill_token_ids``, so V2
needs nothing for them.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
from vllm.config import CUDAGraphMode
from vllm.v1.worker.gpu.cudagraph_utils import BatchExecutionDescriptor, CudaGraphManager
from vllm.v1.worker.gpu.model_states.interface import ModelState

from vllm_multiverse.tree import MultiverseStep
from vllm_multiverse.vllm032 import patches
from vllm_multiverse.vllm032.runner_base import MultiverseRunnerBase
from vllm_multiverse.vllm032.step_inputs import masked_batch, position_deltas

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.worker.gpu.input_batch import InputBatch
    from vllm.v1.worker.gpu.states import RequestState
    from vllm.v1.worker.utils import AttentionGroup

_EMPTY = MultiverseStep()


class MultiverseModelState(ModelState):
    """Mixed into the model state vLLM resolved for the model
    (:func:`model_state_class`). ``multiverse_step`` is the step being run
    (set by the runner; vLLM's dummy runs have none). A subclass of vLLM's
    base class, as the instance's class is swapped (a mixin outside
    ``ModelState``'s hierarchy changes the object layout)."""

    multiverse_step = _EMPTY

    def multiverse_setup(self, device: torch.device, max_num_tokens: int, block_size: int, kernel_block: int) -> None:
        # One persistent buffer: a full CUDA graph captures the positions
        # tensor the model is handed, and replays read it.
        self.multiverse_positions = torch.zeros(max_num_tokens, dtype=torch.int64, device=device)
        self.multiverse_blocks = (block_size, kernel_block)

    def prepare_inputs(self, input_batch: InputBatch, req_states: RequestState) -> dict[str, Any]:
        inputs = super().prepare_inputs(input_batch, req_states)
        positions = self.multiverse_positions[: input_batch.num_tokens_after_padding]
        positions.copy_(input_batch.positions)
        n = input_batch.num_reqs
        delta = position_deltas(
            self.multiverse_step.positions,
            input_batch.req_ids,
            input_batch.query_start_loc_np[: n + 1],
            input_batch.num_computed_tokens_np[:n] + input_batch.num_scheduled_tokens[:n],
            input_batch.num_tokens,
        )
        if delta is not None:
            d = torch.from_numpy(delta)
            if positions.is_cuda:
                d = d.pin_memory().to(positions.device, non_blocking=True)
            positions[: len(delta)] -= d
        return inputs | {"positions": positions}

    def prepare_dummy_inputs(self, num_reqs: int, num_tokens: int) -> dict[str, Any]:
        inputs = super().prepare_dummy_inputs(num_reqs, num_tokens)
        return inputs | {"positions": self.multiverse_positions[:num_tokens]}

    def prepare_attn(
        self,
        input_batch: InputBatch,
        cudagraph_mode: CUDAGraphMode,
        block_tables: tuple[torch.Tensor, ...],
        slot_mappings: torch.Tensor,
        attn_groups: list[list[AttentionGroup]],
        kv_cache_config: KVCacheConfig,
        for_capture: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        attn_metadata = super().prepare_attn(
            input_batch, cudagraph_mode, block_tables, slot_mappings, attn_groups, kv_cache_config, for_capture,
            **kwargs,
        )
        masks = self.multiverse_step.masks
        if masks and attn_metadata and not for_capture:
            n = input_batch.num_reqs
            table = block_tables[0]
            batch = masked_batch(
                masks,
                input_batch.req_ids,
                input_batch.query_start_loc_np[: n + 1],
                input_batch.num_computed_tokens_np[:n] + input_batch.num_scheduled_tokens[:n],
                # The batch's gathered table: rows in batch order, read only by
                # the routes that plan on the host (FlashInfer).
                lambda i, count: table[i, :count].cpu().numpy(),
                *self.multiverse_blocks,
            )
            # One metadata object serves every layer of a KV cache group.
            for md in {id(m): m for m in attn_metadata.values()}.values():
                patches.attach_masked_batch(md, batch)
        return attn_metadata


@functools.cache
def model_state_class(base: type) -> type:
    """``base`` (the model state class vLLM resolved) with the Multiverse
    inputs."""
    return type(f"Multiverse{base.__name__}", (MultiverseModelState, base), {})


class MaskedStepGraphs(CudaGraphManager):
    """Mixed into V2's CUDA-graph manager: a full graph replays the
    attention it captured, which has no mask, so a masked step runs a
    piecewise graph of its size (attention eager, in Python) or eager."""

    masked_step = False

    def dispatch(self, num_reqs: int, num_tokens: int, *args: Any, **kwargs: Any) -> BatchExecutionDescriptor:
        desc = super().dispatch(num_reqs, num_tokens, *args, **kwargs)
        if not self.masked_step or desc.cg_mode != CUDAGraphMode.FULL:
            return desc
        key = (desc.num_tokens, desc.num_active_loras)
        for candidate in self._candidates.get(key, ()):
            if candidate.cg_mode == CUDAGraphMode.PIECEWISE:
                return candidate
        return BatchExecutionDescriptor(
            cg_mode=CUDAGraphMode.NONE,
            num_tokens=num_tokens,
            num_reqs=num_reqs,
            num_active_loras=desc.num_active_loras,
            num_ubatches=desc.num_ubatches,
        )


@functools.cache
def graph_manager_class(base: type) -> type:
    return type(f"Multiverse{base.__name__}", (MaskedStepGraphs, base), {})


class MultiverseRunnerV2Mixin(MultiverseRunnerBase):
    def initialize_kv_cache(self, *args: Any, **kwargs: Any) -> None:
        super().initialize_kv_cache(*args, **kwargs)
        # The block tables and the graph manager are built here; vLLM's
        # profiling run (before) has no Multiverse step to take.
        patches.use_model_state_class(self, model_state_class(type(self.model_state)))
        self.model_state.multiverse_setup(
            self.device, self.max_num_tokens, self.block_tables.block_sizes[0], self.kernel_block_sizes[0]
        )
        if self.cudagraph_manager is not None:
            patches.use_graph_manager_class(self, graph_manager_class(type(self.cudagraph_manager)))

    def update_requests(self, scheduler_output: SchedulerOutput) -> None:
        step = self.multiverse_step(scheduler_output)
        fixed = self._stage_written_tokens(step, scheduler_output)
        super().update_requests(scheduler_output)
        if fixed:
            states = self.req_states
            # V2 advances its computed counts on the device and never takes
            # the scheduler's; where the engine changed a request's text, the
            # scheduler's count is the one that matches it.
            cached = scheduler_output.scheduled_cached_reqs
            for rid, computed in zip(cached.req_ids, cached.num_computed_tokens):
                if rid in fixed:
                    states.num_computed_tokens.stage_write_elem(states.req_id_to_index[rid], computed)
            states.prefill_len.copy_to_uva()
            states.all_token_ids.apply_write()
            states.total_len.apply_write()
            states.num_computed_tokens.apply_write()
        # After vLLM's own block zeroing and copy-on-write, before the forward.
        if step.kv_copies:
            type(self).copy_kv_slots(self.kv_caches, step.kv_copies)
        self.model_state.multiverse_step = step
        if self.cudagraph_manager is not None:
            self.cudagraph_manager.masked_step = bool(step.masks)

    def _stage_written_tokens(self, step: MultiverseStep, scheduler_output: SchedulerOutput) -> set[str]:
        """Tokens the engine wrote (the sequential layer's headers) replace
        what this runner appended on its own (a sampled token the engine
        dropped, or nothing). Up to their end they are prefill: V2 reads the
        inputs from the request's tokens there and samples after the last.
        Staged before vLLM's ``update_requests``, which derives the prefill
        counts; the requests changed."""
        fixed: set[str] = set()
        if not step.token_fixes:  # most steps
            return fixed
        states = self.req_states
        new = {r.req_id for r in scheduler_output.scheduled_new_reqs}
        for rid, (start, tokens) in step.token_fixes.items():
            i = states.req_id_to_index.get(rid)
            if i is None or rid in new:  # a new request's prefill holds its whole text
                continue
            end = start + len(tokens)
            states.all_token_ids.stage_write(i, start, tokens)
            states.total_len.stage_write_elem(i, end)
            states.prefill_len.np[i] = end
            fixed.add(rid)
        return fixed

    def execute_model(self, scheduler_output: SchedulerOutput, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().execute_model(scheduler_output, *args, **kwargs)
        finally:
            if isinstance(self.model_state, MultiverseModelState):
                self.model_state.multiverse_step = _EMPTY
            if isinstance(self.cudagraph_manager, MaskedStepGraphs):
                self.cudagraph_manager.masked_step = False
