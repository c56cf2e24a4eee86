"""``MultiverseGPUWorker``: vLLM 0.32.0's CUDA ``Worker`` with the Multiverse
runner, V1's ``GPUModelRunner`` or Model Runner V2's, each with the hooks
the CPU runners (their subclasses) run as well, plus what only CUDA has:
FlashInfer's masked prefill built or loaded while the model loads, and the
masked route's per-step memory counted in vLLM's memory profile.

Which runner: V1 while the installed vLLM has it, unless the user sets
``VLLM_USE_V2_MODEL_RUNNER=1`` (``wiring.py``): V1 is the route the CUDA-side
tests run through vLLM's own CUDA worker; V2 runs the same hooks as the V2
CPU tests. vLLM 0.34 keeps only V2.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

import torch
from vllm.config import get_layers_from_vllm_config
from vllm.model_executor.layers.attention import Attention
from vllm.v1.worker.gpu.model_runner import GPUModelRunner as GPUModelRunnerV2
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from vllm_multiverse.config import MultiverseConfig
from vllm_multiverse.kernels.kv_copy import copy_token_slots
from vllm_multiverse.kernels.masked_attention import masked_scratch_bytes, warm_up_flashinfer
from vllm_multiverse.vllm032 import attention, check_vllm_version, validate
from vllm_multiverse.vllm032.attention import MaskedRowsImpl
from vllm_multiverse.vllm032.log import init_logger
from vllm_multiverse.vllm032.runner import MultiverseRunnerMixin
from vllm_multiverse.vllm032.runner_v2 import MultiverseRunnerV2Mixin

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = init_logger(__name__)


class CudaMaskedRouteMixin:
    """What both runners do on CUDA only."""

    def _multiverse_after_load(self) -> None:
        super()._multiverse_after_load()
        MaskedRowsImpl.route = self._settle_masked_route()

    def _attention_shape(self) -> tuple[int, int, int]:
        """(query heads, KV heads, head size) of this rank's layers."""
        impl = next(iter(get_layers_from_vllm_config(self.vllm_config, Attention).values())).impl
        return impl.num_heads, impl.num_kv_heads, impl.head_size

    def _settle_masked_route(self) -> str:
        """FlashInfer's FA2 masked prefill built or loaded now, not in the
        first masked step (where nvcc would run inside ``execute_model``:
        without a toolkit the engine dies, with one tensor-parallel ranks
        stall near vLLM's step timeout). Where it cannot be, SDPA, or a
        refusal when FlashInfer was asked for by name."""
        requested = MultiverseConfig.of(self.vllm_config).masked_attention
        if requested == "sdpa" or (requested == "auto" and importlib.util.find_spec("flashinfer") is None):
            return "sdpa"
        try:
            seconds = warm_up_flashinfer(self.device, *self._attention_shape(), self.dtype)
        except Exception as e:  # noqa: BLE001  (whatever FlashInfer or nvcc raise: the reason is logged)
            why = f"{type(e).__name__}: {e}".splitlines()[0]
            if requested == "flashinfer":
                validate.check_flashinfer_built(why)
            logger.warning(
                "Multiverse: FlashInfer's masked prefill did not build or run here (%s); steps with masked rows "
                "go through SDPA over the gathered KV",
                why,
            )
            return "sdpa"
        logger.info("Multiverse: FlashInfer's masked prefill (FA2) built or loaded in %.1f s", seconds)
        return "flashinfer"

    def masked_scratch_bytes(self) -> int:
        """What a step's masked route allocates at most beyond vLLM's forward."""
        return masked_scratch_bytes(
            MaskedRowsImpl.route,
            self.scheduler_config.max_num_batched_tokens,
            self.model_config.max_model_len,
            *self._attention_shape(),
            self.dtype,
            self.cache_config.block_size,
        )

    def profile_run(self, randomize_inputs: bool = False) -> None:
        # Held through vLLM's dummy step, so the peak vLLM sizes the KV cache
        # by counts a masked step's scratch beside the largest batch, and a
        # long masked row cannot run the GPU out of memory after start-up.
        held = torch.empty(self.masked_scratch_bytes(), dtype=torch.uint8, device=self.device)
        try:
            return super().profile_run(randomize_inputs)
        finally:
            del held


class MultiverseGPUModelRunner(CudaMaskedRouteMixin, MultiverseRunnerMixin, GPUModelRunner):
    copy_kv_slots = staticmethod(copy_token_slots)


class MultiverseGPUModelRunnerV2(CudaMaskedRouteMixin, MultiverseRunnerV2Mixin, GPUModelRunnerV2):
    copy_kv_slots = staticmethod(copy_token_slots)


class MultiverseGPUWorker(Worker):
    def __init__(self, vllm_config: VllmConfig, *args: Any, **kwargs: Any) -> None:
        check_vllm_version()
        # Before the model (and its attention layers) is built; the route is
        # settled once FlashInfer's module is built (load_model).
        attention.register(platform_is_cpu=False)
        super().__init__(vllm_config, *args, **kwargs)

    def runner_class(self) -> type[GPUModelRunner | GPUModelRunnerV2]:
        return MultiverseGPUModelRunnerV2 if self.use_v2_model_runner else MultiverseGPUModelRunner

    def _make_model_runner(self) -> GPUModelRunner | GPUModelRunnerV2:
        return self.runner_class()(self.vllm_config, self.device)
