"""``MultiverseCPUWorker``: vLLM 0.32.0's ``CPUWorker`` with the Multiverse
runner: on V1 (vLLM's choice on this CPU build) or on Model Runner V2
(vLLM's choice where Triton reports a CPU backend: tests/triton_cpu)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vllm.v1.worker.cpu.model_runner import CPUModelRunner as CPUModelRunnerV2
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from vllm_multiverse.vllm032 import attention, check_vllm_version, patches
from vllm_multiverse.vllm032.cpu.kv_layout import copy_vec_token_slots, gather_kv
from vllm_multiverse.vllm032.log import init_logger
from vllm_multiverse.vllm032.runner import MultiverseRunnerMixin
from vllm_multiverse.vllm032.runner_v2 import MultiverseRunnerV2Mixin

logger = init_logger(__name__)

if TYPE_CHECKING:
    from vllm.v1.outputs import SamplerOutput
    from vllm.v1.spec_decode.metadata import SpecDecodeMetadata


class MultiverseCPUModelRunner(MultiverseRunnerMixin, CPUModelRunner):
    copy_kv_slots = staticmethod(copy_vec_token_slots)

    # vLLM undoes a discarded sample's draw (a partial prefill's) by moving
    # the request's generator back by its offset, which CPU generators lack:
    # a seeded request in a partial prefill beside other requests stops the
    # engine ("CPU Generator does not use offset"). Every sampled branch is
    # seeded, so partial prefills here sample without their generators (not
    # drawing from them is the undo) and get them back after vLLM's
    # bookkeeping.
    _mv_set_aside: dict[int, torch.Generator] = {}

    def _sample(self, logits: torch.Tensor | None, spec_decode_metadata: SpecDecodeMetadata | None) -> SamplerOutput:
        gens = self.input_batch.generators
        discard = self.discard_request_mask.np[: self.input_batch.num_reqs]
        self._mv_set_aside = {i: gens.pop(i) for i in np.flatnonzero(discard).tolist() if i in gens}
        try:
            return super()._sample(logits, spec_decode_metadata)
        except BaseException:
            self._give_generators_back()
            raise

    def _bookkeeping_sync(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super()._bookkeeping_sync(*args, **kwargs)
        finally:
            self._give_generators_back()

    def _give_generators_back(self) -> None:
        self.input_batch.generators.update(self._mv_set_aside)
        self._mv_set_aside = {}


class MultiverseCPUModelRunnerV2(MultiverseRunnerV2Mixin, CPUModelRunnerV2):
    # V2 samples with counter-based noise keyed by seed and position, not
    # with the CPU generators V1 has to set aside.
    copy_kv_slots = staticmethod(copy_vec_token_slots)


RUNNERS = {CPUModelRunner: MultiverseCPUModelRunner, CPUModelRunnerV2: MultiverseCPUModelRunnerV2}


class MultiverseCPUWorker(CPUWorker):
    def init_device(self) -> None:
        check_vllm_version()
        # Before the model (and its attention layers) is built.
        attention.register(platform_is_cpu=True, gather=gather_kv)
        super().init_device()
        # CPUWorker builds its runner inline, so the class is swapped here.
        runner_cls = RUNNERS[type(self.model_runner)]
        patches.use_runner_class(self, runner_cls)
        logger.info(
            "Multiverse: %s on CPU (vLLM's choice: %s)",
            "Model Runner V2" if runner_cls is MultiverseCPUModelRunnerV2 else "the V1 model runner",
            "Triton reports a CPU backend" if runner_cls is MultiverseCPUModelRunnerV2 else "no Triton CPU backend",
        )
