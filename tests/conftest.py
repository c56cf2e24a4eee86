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

# Model Runner V2 on this CPU (``--model-runner v2``): vLLM picks V2 where
# Triton reports a CPU backend; tests/triton_cpu is one, seen only by this
# process and its children (a V1 engine that sees it without Triton's
# interpreter dies).
TRITON_CPU = ROOT / "tests" / "triton_cpu"


def pytest_addoption(parser):
    parser.addoption(
        "--model-runner",
        choices=("v1", "v2"),
        default="v1",
        help="v2: run the tests marked both_runners on vLLM's Model Runner V2 (tests/triton_cpu), and only those",
    )


# pytest's cache (``.pytest_cache``): engine_harness keeps the reference's
# outputs there, so that the V1 and V2 sessions of one ``make test`` share them.
REFERENCE_CACHE = None


def pytest_configure(config):
    global REFERENCE_CACHE
    REFERENCE_CACHE = getattr(config, "cache", None)
    if config.getoption("--model-runner") != "v2":
        return
    # Triton finds its backends when it is first imported.
    assert "triton" not in sys.modules, "Triton was imported before the test Triton backend was put on the path"
    sys.path.insert(0, str(TRITON_CPU))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TRITON_CPU), str(ROOT), os.environ.get("PYTHONPATH")]))
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"


def model_runner() -> str:
    """The runner this session's engines use ("v1" or "v2")."""
    return "v2" if os.environ.get("VLLM_USE_V2_MODEL_RUNNER") == "1" else "v1"


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


@pytest.hookimpl(tryfirst=True)  # before ``-m`` selects: the V2 slow marks count
def pytest_collection_modifyitems(config, items):
    """Modules that share an engine (their ``SHARED_ENGINE``) run one after
    another, from where the first of them would run. On V2, only the tests
    marked ``both_runners``; those marked ``both_runners(v2="slow")`` are
    slow there (Triton's interpreter runs V2's kernels on this CPU, at a
    cost per kernel and request)."""
    if config.getoption("--model-runner") == "v2":
        kept = []
        for item in items:
            mark = item.get_closest_marker("both_runners")
            if mark is None:
                continue
            if mark.kwargs.get("v2") == "slow":
                item.add_marker(pytest.mark.slow)
            kept.append(item)
        ids = {id(item) for item in kept}
        config.hook.pytest_deselected(items=[item for item in items if id(item) not in ids])
        items[:] = kept

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
