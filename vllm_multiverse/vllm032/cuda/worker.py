"""``MultiverseGPUWorker``: vLLM 0.32.0's CUDA ``Worker`` with the Multiverse
runner, which is vLLM's V1 ``GPUModelRunner`` with the hooks the CPU runner
(its subclass) runs as well.

Why V1 and not Model Runner V2 (vLLM 0.32's CUDA default): V2 computes the
KV slot mapping from the positions it hands the model (``prepare_attn`` after
``prepare_pos_seq_lens``), so the runner hooks' position patch would write
KV to the wrong slots there; V2 takes Multiverse positions through its model
state's ``prepare_inputs`` instead, and resumed requests arrive as new ones.
V2 needs Triton, which vLLM's CPU build lacks, so none of that could be
tested here, while V1 runs the same hook code as every CPU test. Start-up
picks V1 for Multiverse engines (``VLLM_USE_V2_MODEL_RUNNER=0``, logged);
docs/attention.md lists what a V2 port needs.
"""

from __future__ import annotations

from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from vllm_multiverse.config import ADDITIONAL_CONFIG_KEY, MultiverseConfig
from vllm_multiverse.kernels.kv_copy import copy_token_slots
from vllm_multiverse.vllm032 import attention, check_vllm_version
from vllm_multiverse.vllm032.runner import MultiverseRunnerMixin


class MultiverseGPUModelRunner(MultiverseRunnerMixin, GPUModelRunner):
    copy_kv_slots = staticmethod(copy_token_slots)


class MultiverseGPUWorker(Worker):
    def __init__(self, vllm_config, *args, **kwargs):
        check_vllm_version()
        cfg = MultiverseConfig.from_dict(vllm_config.additional_config.get(ADDITIONAL_CONFIG_KEY))
        # Before the model (and its attention layers) is built.
        attention.register(platform_is_cpu=False, route=cfg.masked_attention)
        super().__init__(vllm_config, *args, **kwargs)

    def _make_model_runner(self) -> GPUModelRunner:
        if self.use_v2_model_runner:
            raise RuntimeError("Multiverse decoding runs on the V1 model runner; start-up should have chosen it")
        return MultiverseGPUModelRunner(self.vllm_config, self.device)
