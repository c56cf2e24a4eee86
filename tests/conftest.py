import contextlib
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The tests' own helpers; the tiny model's task (tiny_model/); the replay
# benchmark's forcing logits processor (benchmarks/forcing.py).
sys.path[:0] = [str(Path(__file__).parent), str(ROOT), str(ROOT / "benchmarks")]
TINY_MODEL = ROOT / "models" / "multiverse-tiny"

# vLLM's CUDA platform stood in for: only in the process test_cuda_platform.py starts.
CUDA_PLATFORM_ENV = "MULTIVERSE_CUDA_PLATFORM_TESTS"
collect_ignore = [] if os.environ.get(CUDA_PLATFORM_ENV) == "1" else ["cuda_platform"]

# Small enough for 2 cores and 24 GiB; the CPU worker's default share of the
# NUMA node does not fit here (see shared notes).
LLM_DEFAULTS = dict(
    dtype="float32",
    enforce_eager=True,
    max_model_len=2048,
    kv_cache_memory_bytes=512 * 2**20,
    seed=0,
)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    if not (TINY_MODEL / "model.safetensors").exists():
        pytest.fail(f"bundled model missing: {TINY_MODEL} (make model)")
    return TINY_MODEL


@pytest.fixture(scope="session")
def mv32b_dir(tmp_path_factory) -> Path:
    """A Multiverse-32B-shaped checkpoint (tests/multiverse32b.py), built once."""
    import multiverse32b

    return multiverse32b.build(tmp_path_factory.mktemp("multiverse-32b-shaped"))


@contextlib.contextmanager
def environ(name: str, value: str):
    """An environment variable set for a block (module fixtures use it)."""
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


@contextlib.contextmanager
def in_process_llm(model_dir, **overrides):
    """A ``vllm.LLM`` on the tiny-model defaults, its engine core in this
    process so that tests can look at the scheduler (one per test module:
    an engine takes 20-30 s to start here)."""
    from vllm import LLM

    from vllm_multiverse.vllm032.plugin import register

    register()  # vLLM may have loaded plugins in this process under another allow-list
    with environ("VLLM_ENABLE_V1_MULTIPROCESSING", "0"):
        llm = LLM(model=str(model_dir), **(LLM_DEFAULTS | overrides))
        try:
            yield llm
        finally:
            llm.llm_engine.engine_core.shutdown()
