"""vLLM's CUDA-side Python with the plugin, on this machine without a GPU:
``tests/cuda_platform/`` runs in a process of its own, where vLLM resolves
its CUDA platform (the stand-ins for a GPU and vLLM's compiled CUDA
extensions are listed in its conftest.py) and FlashInfer imports."""

import os
import subprocess
import sys

from conftest import CUDA_PLATFORM_ENV, ROOT

CUDA_SIDE = ROOT / ".venv" / "cuda-side"  # FlashInfer, for these tests only (scripts/setup.sh)


def test_vllms_cuda_side_runs_the_plugin():
    assert (CUDA_SIDE / "flashinfer").is_dir(), f"{CUDA_SIDE} is missing: run scripts/setup.sh"
    env = dict(os.environ, **{CUDA_PLATFORM_ENV: "1"})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CUDA_SIDE), env.get("PYTHONPATH")]))
    env.pop("VLLM_USE_V2_MODEL_RUNNER", None)
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "tests/cuda_platform"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-20000:]
    assert " passed" in out and "skipped" not in out and "error" not in out.splitlines()[-1], out[-3000:]
