"""vLLM 0.32's CUDA platform in this process, on a machine with no GPU, for
``test_on_cuda_platform.py`` (``tests/test_cuda_platform.py`` runs it in a
process of its own: these stand-ins must come before vLLM resolves its
platform, and must not leak into the rest of the suite).

Everything vLLM does on its CUDA platform that is Python and needs no GPU
runs for real: platform detection of backends, the attention selector and
its resolver, ``CudaPlatform.check_and_update_config``, the engine config,
the CUDA worker, the V1 GPU runner (on the CPU device, as vLLM's own CPU
runner builds it), its KV-cache layout and allocation, its state updates,
the CUDA-graph dispatcher, FlashInfer's Python. What a CUDA machine has and
this one lacks is stood in for, here and nowhere else:

- GPUs: H100s (compute capability 9.0, 80 GiB, 132 SMs), 8 in the node,
  this process on device 0,
  no memory in use, no pinned host memory (this machine has no allocator
  for it);
- vLLM's compiled CUDA extensions: ``vllm._C_stable_libtorch`` and the
  FlashAttention modules ``_vllm_fa2_C``/``_vllm_fa3_C`` as empty modules,
  the CUTLASS FP8 capability queries answering no;
- the CUDA wheel's version string (no ``+cpu``) and Triton's NVIDIA driver
  reporting itself active, so vLLM turns Triton on as it does with a GPU.

FlashInfer comes from the folder ``scripts/setup.sh`` installs it to
(``.venv/cuda-side``), on this process's ``PYTHONPATH`` only.
"""

from __future__ import annotations

import sys
import types

CAPABILITY = [(9, 0)]  # a list so a test can switch it (vLLM caches by capability)


def _stand_ins() -> None:
    for name in ("vllm._C_stable_libtorch", "vllm.vllm_flash_attn._vllm_fa2_C", "vllm.vllm_flash_attn._vllm_fa3_C"):
        sys.modules.setdefault(name, types.ModuleType(name))

    import torch
    import vllm.platforms as platforms
    from triton.backends.nvidia.driver import CudaDriver

    platforms.vllm_version_matches_substr = lambda substr: False
    CudaDriver.is_active = staticmethod(lambda: True)
    torch.accelerator.current_device_index = lambda: 0

    from vllm.platforms import cuda
    from vllm.platforms.interface import DeviceCapability

    p = cuda.CudaPlatform
    p.get_device_capability = classmethod(lambda cls, device_id=0: DeviceCapability(*CAPABILITY[0]))
    p.get_device_name = classmethod(lambda cls, device_id=0: "NVIDIA H100 80GB HBM3")
    p.get_device_total_memory = classmethod(lambda cls, device_id=0: 80 * 2**30)
    p.num_compute_units = classmethod(lambda cls, device_id=0: 132)
    p.device_count = classmethod(lambda cls: 8)
    p.get_current_memory_usage = classmethod(lambda cls, device=None: 0.0)
    p.is_pin_memory_available = classmethod(lambda cls: False)
    platforms.current_platform = p()

    import vllm._custom_ops as ops

    ops.cutlass_scaled_mm_supports_block_fp8 = lambda capability: False
    ops.cutlass_scaled_mm_supports_fp8 = lambda capability: False

    from vllm.plugins import load_general_plugins

    load_general_plugins()


_stand_ins()
