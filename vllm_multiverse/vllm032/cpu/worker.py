"""``MultiverseCPUWorker``: vLLM 0.32.0's ``CPUWorker`` with the Multiverse runner."""

from __future__ import annotations

from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from vllm_multiverse.vllm032 import attention, check_vllm_version
from vllm_multiverse.vllm032.cpu.kv_layout import copy_token_slots
from vllm_multiverse.vllm032.runner import MultiverseRunnerMixin


class MultiverseCPUModelRunner(MultiverseRunnerMixin, CPUModelRunner):
    copy_kv_slots = staticmethod(copy_token_slots)


class MultiverseCPUWorker(CPUWorker):
    def init_device(self):
        check_vllm_version()
        # Before the model (and its attention layers) is built.
        attention.register(platform_is_cpu=True, route="sdpa")
        super().init_device()
        # CPUWorker builds its runner inline (the V1 runner: start-up refused
        # V2), so the class is swapped here.
        assert type(self.model_runner) is CPUModelRunner, type(self.model_runner)
        self.model_runner.__class__ = MultiverseCPUModelRunner
