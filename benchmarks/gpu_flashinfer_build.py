"""What the plugin pays at engine start-up for FlashInfer's masked prefill:
``warm_up_flashinfer`` at Multiverse-32B's attention shape (40 query heads,
8 KV heads, head size 128, bf16), which builds FlashInfer's FA2 batch-prefill
module with nvcc the first time on a machine and loads it from FlashInfer's
JIT cache after.

    python benchmarks/gpu_flashinfer_build.py --cold   # the cache must be empty: times the build
    python benchmarks/gpu_flashinfer_build.py          # times a load from the cache

FlashInfer 0.7.0.post1 keeps its JIT cache under
``$FLASHINFER_WORKSPACE_BASE/.cache/flashinfer`` (``flashinfer/jit/env.py``;
default: the home directory); scripts/gpu_check.sh points it at a fresh
folder. ``FLASHINFER_CUDA_ARCH_LIST`` picks the archs it compiles for,
``MAX_JOBS`` its ninja jobs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_summary import record  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cold", action="store_true", help="fail unless FlashInfer's JIT cache is empty")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_flashinfer_build: needs a CUDA GPU", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    try:
        import flashinfer
        from flashinfer.jit import env as jit_env
    except ImportError as e:
        print(f"gpu_flashinfer_build: cannot import flashinfer ({e}); scripts/gpu_wheels.sh", file=sys.stderr)
        return 1
    imported = time.perf_counter() - t0
    built = sorted(jit_env.FLASHINFER_JIT_DIR.rglob("*.so")) if jit_env.FLASHINFER_JIT_DIR.exists() else []
    print(f"flashinfer {flashinfer.__version__}, JIT cache {jit_env.FLASHINFER_JIT_DIR}: {len(built)} modules")
    if args.cold and built:
        print(f"gpu_flashinfer_build: --cold but the JIT cache holds {built[:3]}", file=sys.stderr)
        return 1

    from vllm_multiverse.kernels.masked_attention import warm_up_flashinfer

    seconds = warm_up_flashinfer(
        torch.device("cuda"), num_heads=40, num_kv_heads=8, head_size=128, dtype=torch.bfloat16
    )
    now = sorted(jit_env.FLASHINFER_JIT_DIR.rglob("*.so"))
    what = "built" if args.cold else "loaded"
    record(
        f"warm_up_flashinfer, 40/8 heads, head 128, bf16 ({'cold cache' if args.cold else 'from the JIT cache'})",
        bool(now),
        seconds=f"{seconds:.1f}",
        import_flashinfer_s=f"{imported:.1f}",
        modules=f"{len(now)} {what}" if args.cold else len(now),
    )
    return 0 if now else 1


if __name__ == "__main__":
    sys.exit(main())
