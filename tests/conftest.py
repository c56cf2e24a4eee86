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


class EnginePool:
    """In-process engines shared across test modules: one alive at a time,
    kept while modules ask for the same configuration (the collection order
    puts modules that share one together: ``SHARED_ENGINE``)."""

    def __init__(self) -> None:
        self._key = None
        self._stack = contextlib.ExitStack()
        self._llm = None

    def get(self, model_dir, **overrides):
        key = (str(model_dir), repr(sorted(overrides.items())))
        if key != self._key:
            self.close()
            self._llm = self._stack.enter_context(in_process_llm(model_dir, **overrides))
            self._key = key
        return self._llm

    def close(self) -> None:
        self._stack.close()
        self._key = self._llm = None


@pytest.fixture(scope="session")
def engines():
    pool = EnginePool()
    yield pool
    pool.close()


def pytest_collection_modifyitems(items):
    """Modules that share an engine (their ``SHARED_ENGINE``) run one after
    another, from where the first of them would run."""

    def group(item) -> str:
        module = item.module
        return getattr(module, "SHARED_ENGINE", None) or module.__name__

    first: dict[str, int] = {}
    for i, item in enumerate(items):
        first.setdefault(group(item), i)
    items.sort(key=lambda item: first[group(item)])


@pytest.fixture(scope="module")
def client(openai_base):
    """An OpenAI client of the module's server (its ``openai_base``)."""
    from openai import OpenAI

    return OpenAI(base_url=openai_base + "/v1", api_key="none", timeout=900)


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
