"""``MultiverseCPUWorker``: vLLM 0.32.0's ``CPUWorker`` with the Multiverse runner."""

from __future__ import annotations

import torch
from vllm.v1.worker.cpu_worker import CPUWorker

from vllm_multiverse.engine.runner import MultiverseCPUModelRunner
from vllm_multiverse.engine.vllm_compat import check_vllm_version


class MultiverseCPUWorker(CPUWorker):
    def init_device(self):
        check_vllm_version()
        super().init_device()
        if self.model_runner.__class__.__name__ != "CPUModelRunner" or self.use_v2_model_runner:
            raise RuntimeError("Multiverse decoding on CPU needs vLLM's V1 CPU model runner")
        if self.vllm_config.model_config.dtype != torch.float32:
            raise ValueError(
                "Multiverse decoding on CPU supports float32 only (the merge copies KV in the "
                "float32 CPU cache layout); pass dtype='float32'"
            )
        # CPUWorker builds its runner inline, so the class is swapped here.
        self.model_runner.__class__ = MultiverseCPUModelRunner
