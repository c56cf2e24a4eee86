"""A Multiverse engine on vLLM 0.32's CUDA platform, as far as it runs
without a GPU (the stand-ins for what a CUDA machine has are in this
folder's conftest.py): the engine config the plugin's wiring makes, the
attention layers the model builds (the selector's round trip through the
class's dotted path), the CUDA worker and its V1 runner, the runner's KV
cache, state updates and CUDA-graph dispatch on a masked step, FlashInfer
settled while the model loads, refusals of what the engine cannot serve.
Where a piece needs the GPU itself (a kernel, a memory profile) the test
stops just before it; docs/attention.md lists those pieces."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CAPABILITY
from vllm.config import CompilationMode, CUDAGraphMode, set_current_vllm_config
from vllm.engine.arg_utils import EngineArgs
from vllm.model_executor.layers.attention import Attention
from vllm.platforms import current_platform
from vllm.sampling_params import SamplingParams
from vllm.utils.import_utils import resolve_obj_by_qualname
from vllm.utils.torch_utils import set_default_torch_dtype
from vllm.v1.attention.backends.registry import AttentionBackendEnum
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput

from vllm_multiverse.kernels.masked_attention import MaskedBatch, sdpa_peak_bytes
from vllm_multiverse.kernels.packed_mask import MaskedRow
from vllm_multiverse.tree import MultiverseStep
from vllm_multiverse.vllm032 import attention, wiring
from vllm_multiverse.vllm032.attention import MaskedRowsImpl
from vllm_multiverse.vllm032.cuda.worker import (
    CudaMaskedRouteMixin,
    MultiverseGPUModelRunner,
    MultiverseGPUModelRunnerV2,
    MultiverseGPUWorker,
)
from vllm_multiverse.vllm032.runner import MultiverseCudagraphDispatcher
from vllm_multiverse.vllm032.validate import MultiverseConfigError

TINY = Path(__file__).resolve().parents[2] / "models" / "multiverse-tiny"
MULTIVERSE_WORKER = "vllm_multiverse.vllm032.cuda.worker.MultiverseGPUWorker"
IMPLS = {
    "FLASH_ATTN": "vllm.v1.attention.backends.flash_attn.FlashAttentionImpl",
    "FLASHINFER": "vllm.v1.attention.backends.flashinfer.FlashInferImpl",
    "TRITON_ATTN": "vllm.v1.attention.backends.triton_attn.TritonAttentionImpl",
}


def engine_config(**overrides):
    """What ``vllm serve`` / ``LLM`` build for the tiny model on an H100,
    through the plugin's wiring (a general plugin, loaded as vLLM loads it)."""
    return EngineArgs(model=str(TINY), dtype="bfloat16", max_model_len=2048, **overrides).create_engine_config()


def attention_layers(cfg, n: int = 2) -> list[Attention]:
    """The model's attention layers, built as the model builds them (its
    dtype the default, the config current): each resolves its backend."""
    mc, pc = cfg.model_config, cfg.parallel_config
    with set_current_vllm_config(cfg), set_default_torch_dtype(mc.dtype):
        return [
            Attention(
                num_heads=mc.get_num_attention_heads(pc),
                head_size=mc.get_head_size(),
                scale=mc.get_head_size() ** -0.5,
                num_kv_heads=mc.get_num_kv_heads(pc),
                cache_config=cfg.cache_config,
                prefix=f"model.layers.{i}.self_attn.attn",
            )
            for i in range(n)
        ]


@pytest.fixture(autouse=True)
def fresh_selection():
    """vLLM caches backend choices per process; each test decides afresh."""
    from vllm.platforms.cuda import _get_backend_priorities
    from vllm.v1.attention.selector import _cached_get_attn_backend

    yield
    _cached_get_attn_backend.cache_clear()
    _get_backend_priorities.cache_clear()
    CAPABILITY[0] = (9, 0)
    os.environ.pop(wiring.V2_ENV, None)
    wiring._set_v1_env = False


@pytest.fixture(scope="module")
def distributed():
    """One rank's process groups, as the CUDA worker's init_device makes
    them (gloo here, NCCL there)."""
    from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment
    from vllm.utils.network_utils import get_open_port

    with set_current_vllm_config(engine_config()):
        init_distributed_environment(1, 0, f"tcp://127.0.0.1:{get_open_port()}", 0, "gloo")
        ensure_model_parallel_initialized(1, 1)


def worker_and_runner(cfg):
    """The Multiverse CUDA worker (it registers the backends) and the runner
    it builds, on the CPU device the way vLLM's CPU runner builds its GPU
    parent (CUDA streams and events as no-ops)."""
    from vllm.v1.worker.cpu_model_runner import _set_torch_accelerator_to_noop, _torch_cuda_wrapper

    with set_current_vllm_config(cfg):
        worker = MultiverseGPUWorker(
            vllm_config=cfg, local_rank=0, rank=0, distributed_init_method="tcp://127.0.0.1:0", is_driver_worker=True
        )
    worker.device = torch.device("cpu")
    _set_torch_accelerator_to_noop()
    with set_current_vllm_config(cfg), _torch_cuda_wrapper():
        worker.model_runner = worker._make_model_runner()
    return worker, worker.model_runner


# -- the engine config ------------------------------------------------------


def test_a_multiverse_engine_config_on_cuda():
    cfg = engine_config()
    stock = EngineArgs(model=str(TINY), dtype="bfloat16", max_model_len=2048,
                       additional_config={"multiverse": {"enabled": False}})  # fmt: skip
    assert cfg.parallel_config.worker_cls == MULTIVERSE_WORKER  # not CudaPlatform's "auto" -> Worker
    assert cfg.scheduler_config.scheduler_cls == wiring.SCHEDULER_CLS
    assert cfg.cache_config.block_size == 16
    assert cfg.compilation_config.mode == CompilationMode.VLLM_COMPILE
    assert cfg.compilation_config.cudagraph_mode == CUDAGraphMode.FULL_AND_PIECEWISE
    # vLLM's own choice on CUDA is Model Runner V2 and async scheduling; the
    # wiring built the config again with V1, for the engine's processes too.
    assert not cfg.use_v2_model_runner and os.environ[wiring.V2_ENV] == "0"
    assert not cfg.scheduler_config.async_scheduling
    mv = cfg.additional_config["multiverse"]
    assert mv["enabled"] is True and mv["masked_attention"] == "auto"
    # The double create_engine_config is idempotent.
    again = engine_config()
    for get in (lambda c: c.parallel_config.worker_cls, lambda c: c.cache_config.block_size,
                lambda c: c.compilation_config.cudagraph_mode, lambda c: c.additional_config,
                lambda c: c.use_v2_model_runner):  # fmt: skip
        assert get(again) == get(cfg)
    # A stock engine built later in the process is vLLM's, V2 runner included.
    plain = stock.create_engine_config()
    assert plain.use_v2_model_runner and wiring.V2_ENV not in os.environ
    assert plain.parallel_config.worker_cls == "vllm.v1.worker.gpu_worker.Worker"
    assert plain.scheduler_config.async_scheduling


def test_a_users_own_v1_choice_stays(monkeypatch):
    monkeypatch.setenv(wiring.V2_ENV, "0")
    engine_config()
    stock = {"multiverse": {"enabled": False}}
    EngineArgs(model=str(TINY), dtype="bfloat16", additional_config=stock).create_engine_config()
    assert os.environ[wiring.V2_ENV] == "0"


REFUSED = {
    "float32": (dict(dtype="float32"), "float32 on CUDA"),
    "flex attention": (dict(attention_backend="FLEX_ATTENTION"), "FLEX_ATTENTION"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_on_cuda_with_the_way_out(case):
    kwargs, named = REFUSED[case]
    with pytest.raises(MultiverseConfigError, match=named) as err:
        EngineArgs(**({"model": str(TINY), "dtype": "bfloat16", "max_model_len": 2048} | kwargs)).create_engine_config()
    assert "--no-multiverse-enabled" in str(err.value)


# Engines vLLM only configures with more GPUs (tensor parallelism brings in
# compilation passes that need vLLM's compiled CUDA ops) or MoE all-to-all
# kernels: the start-up check on the config such an engine would have.
PARALLEL = {
    "decode context parallelism": ("decode_context_parallel_size", 2, "--decode-context-parallel-size"),
    "prefill context parallelism": ("prefill_context_parallel_size", 2, "--prefill-context-parallel-size"),
    "dual-batch overlap": ("enable_dbo", True, "--enable-dbo"),
}


@pytest.mark.parametrize("case", list(PARALLEL))
def test_refused_parallelism(case):
    from vllm_multiverse.vllm032.validate import validate

    field, value, named = PARALLEL[case]
    cfg = engine_config()
    validate(cfg)
    setattr(cfg.parallel_config, field, value)
    for runner_chosen in (False, True):  # before the V1 switch too: vLLM's V1 runner refuses PCP in its words
        with pytest.raises(MultiverseConfigError, match=named) as err:
            validate(cfg, runner_chosen=runner_chosen)
        assert "--no-multiverse-enabled" in str(err.value)


def test_model_runner_v2_asked_for_is_kept(monkeypatch):
    """``VLLM_USE_V2_MODEL_RUNNER=1`` on CUDA: the config keeps V2 and the
    worker builds the Multiverse V2 runner (building it needs CUDA memory;
    the V2 CPU tests build its CPU twin)."""
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as GPUModelRunnerV2

    monkeypatch.setenv(wiring.V2_ENV, "1")
    cfg = engine_config()
    assert cfg.use_v2_model_runner and cfg.scheduler_config.scheduler_cls == wiring.SCHEDULER_CLS
    with set_current_vllm_config(cfg):
        worker = MultiverseGPUWorker(
            vllm_config=cfg, local_rank=0, rank=0, distributed_init_method="tcp://127.0.0.1:0", is_driver_worker=True
        )
    assert worker.use_v2_model_runner
    assert worker.runner_class() is MultiverseGPUModelRunnerV2 and issubclass(worker.runner_class(), GPUModelRunnerV2)


# -- the attention layers the model builds ---------------------------------


@pytest.mark.parametrize(
    "capability,selected,chosen",
    [
        ((9, 0), None, "FLASH_ATTN"),  # H100/H200: vLLM's default
        ((10, 0), None, "FLASHINFER"),  # B200: vLLM's default
        ((9, 0), "FLASH_ATTN", "FLASH_ATTN"),
        ((9, 0), "FLASHINFER", "FLASHINFER"),
        ((9, 0), "TRITON_ATTN", "TRITON_ATTN"),
    ],
)
def test_the_model_builds_its_attention_on_the_multiverse_backends(capability, selected, chosen):
    """vLLM's CUDA selector returns ``module + "." + __qualname__`` of the
    registered class and resolves that path again while each layer is
    built: the plugin's classes answer to their own names."""
    CAPABILITY[0] = capability
    cfg = engine_config(attention_backend=selected)
    worker_and_runner(cfg)  # the worker registers the backends, as in its process
    for layer in attention_layers(cfg):
        backend = layer.attn_backend
        assert backend.get_name() == chosen
        assert resolve_obj_by_qualname(".".join(backend.full_cls_name())) is backend
        assert resolve_obj_by_qualname(AttentionBackendEnum[chosen].get_path()) is backend
        impl = type(layer.impl)
        assert issubclass(impl, MaskedRowsImpl) and issubclass(impl, resolve_obj_by_qualname(IMPLS[chosen]))
        assert impl.forward is MaskedRowsImpl.forward
    from vllm_multiverse.vllm032.validate import check_attention_layers

    check_attention_layers(cfg)  # what load_model checks: nothing refused


def test_the_selector_path_of_every_backend_resolves():
    worker_and_runner(engine_config())
    from vllm.v1.attention.selector import AttentionSelectorConfig

    selector = AttentionSelectorConfig(head_size=128, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=16)
    for name in attention.CUDA_BACKENDS:
        path = current_platform.get_attn_backend_cls(AttentionBackendEnum[name], selector, num_heads=40)
        assert path == f"{attention.__name__}.Multiverse_{name}"
        assert resolve_obj_by_qualname(path).get_name() == name


# -- the worker, its runner, a step ---------------------------------------


def test_the_cuda_worker_builds_the_multiverse_v1_runner():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    worker, runner = worker_and_runner(engine_config())
    assert type(runner) is MultiverseGPUModelRunner and isinstance(runner, GPUModelRunner)
    assert not worker.use_v2_model_runner


@pytest.mark.parametrize("requested", ["auto", "flashinfer", "sdpa"])
def test_flashinfer_is_settled_while_the_model_loads(requested, caplog):
    """FlashInfer's masked prefill is built or loaded after the model, not
    in the first masked step. Here it imports but cannot run (no GPU): a
    real failure, so "auto" falls back to SDPA, logged, and "flashinfer"
    asked for by name refuses to start."""
    import flashinfer  # noqa: F401  (setup.sh installs it for these tests)

    cfg = engine_config(additional_config={"multiverse": {"masked_attention": requested}})
    _, runner = worker_and_runner(cfg)
    attention_layers(cfg)
    with caplog.at_level(logging.INFO, logger="vllm"):
        if requested == "flashinfer":
            with pytest.raises(MultiverseConfigError, match="did not build or run here"):
                runner._multiverse_after_load()
            return
        runner._multiverse_after_load()
    assert isinstance(runner.cudagraph_dispatcher, MultiverseCudagraphDispatcher)
    assert MaskedRowsImpl.route == "sdpa"
    tried = "FlashInfer's masked prefill did not build or run here" in caplog.text
    assert tried == (requested == "auto")


def test_the_masked_routes_memory_is_reserved_before_the_kv_cache():
    """What ``profile_run`` holds through vLLM's dummy step covers a step's
    largest masked row (SDPA) or the packed mask of a whole step (FlashInfer)."""
    cfg = engine_config()
    _, runner = worker_and_runner(cfg)
    attention_layers(cfg)
    mc, pc = cfg.model_config, cfg.parallel_config
    tokens, max_len = cfg.scheduler_config.max_num_batched_tokens, mc.max_model_len
    heads, kv_heads, d = mc.get_num_attention_heads(pc), mc.get_num_kv_heads(pc), mc.get_head_size()
    for runner_cls in (MultiverseGPUModelRunner, MultiverseGPUModelRunnerV2):
        assert runner_cls.profile_run is CudaMaskedRouteMixin.profile_run
    for route, covers in (
        ("sdpa", sdpa_peak_bytes(tokens, max_len, heads, kv_heads, d, torch.bfloat16, 16)),
        ("flashinfer", tokens * max_len // 8),
    ):
        MaskedRowsImpl.route = route
        assert runner.masked_scratch_bytes() >= covers


def _new_request(rid: str, tokens: list[int], block: int) -> NewRequestData:
    return NewRequestData(
        req_id=rid,
        prompt_token_ids=tokens,
        mm_features=[],
        sampling_params=SamplingParams(max_tokens=4),
        pooling_params=None,
        block_ids=([block],),
        num_computed_tokens=0,
        lora_request=None,
    )


def _with_kv_cache(cfg):
    """The runner after the engine core's KV-cache set-up: the layout
    resolved over what the worker supports, the cache allocated and the
    attention backends initialised on it."""
    from vllm.v1.attention.backends.utils import resolve_kv_cache_layout
    from vllm.v1.core.kv_cache_utils import get_kv_cache_configs
    from vllm.v1.worker.cpu_model_runner import _torch_cuda_wrapper

    worker, runner = worker_and_runner(cfg)
    attention_layers(cfg)
    with set_current_vllm_config(cfg), _torch_cuda_wrapper():
        specs = worker.get_kv_cache_spec()
        layout = resolve_kv_cache_layout(cfg, [worker.get_supported_kv_cache_layouts()], list(specs.values()))
        worker.set_kv_cache_layout(layout.name)
        kv_config = get_kv_cache_configs(cfg, [specs], [64 * 2**20])[0]
        kv_config.kv_cache_layout = cfg.cache_config.kv_cache_layout
        runner.initialize_kv_cache(kv_config)
    runner._multiverse_after_load()
    runner.cudagraph_dispatcher.initialize_cudagraph_keys(cfg.compilation_config.cudagraph_mode, 1)
    return runner


def test_a_masked_step_never_replays_a_full_cuda_graph(distributed):
    runner = _with_kv_cache(engine_config())
    dispatcher = runner.cudagraph_dispatcher
    step = SchedulerOutput.make_empty()
    step.scheduled_new_reqs = [_new_request("r", [5, 6, 7, 8], 1)]
    step.num_scheduled_tokens, step.total_num_scheduled_tokens = {"r": 4}, 4
    step.multiverse = MultiverseStep(masks={"r": [(2, 4, 0, 1)]})
    runner._update_states(step)
    assert runner.input_batch.req_ids == ["r"]
    assert dispatcher.dispatch(num_tokens=1, uniform_decode=True)[0] == CUDAGraphMode.PIECEWISE
    decode = SchedulerOutput.make_empty()
    decode.scheduled_cached_reqs = CachedRequestData(
        req_ids=["r"], resumed_req_ids=set(), new_token_ids=[[9]], all_token_ids={}, new_block_ids=[None],
        num_computed_tokens=[4], num_output_tokens=[1],
    )  # fmt: skip
    decode.num_scheduled_tokens, decode.total_num_scheduled_tokens = {"r": 1}, 1
    decode.multiverse = MultiverseStep()
    runner._update_states(decode)
    assert dispatcher.dispatch(num_tokens=1, uniform_decode=True)[0] == CUDAGraphMode.FULL


def test_a_step_without_its_multiverse_data_fails_loudly(distributed):
    """Were ``SchedulerOutput.multiverse`` lost on the way to a rank, the
    step would decode with token-index positions and no merge copies."""
    runner = _with_kv_cache(engine_config())
    step = SchedulerOutput.make_empty()
    step.scheduled_new_reqs = [_new_request("r", [5, 6, 7], 1)]
    step.num_scheduled_tokens, step.total_num_scheduled_tokens = {"r": 3}, 3
    with pytest.raises(RuntimeError, match="without its Multiverse step data"):
        runner._update_states(step)
    assert "r" not in runner.requests


class _RecordedFlashInfer:
    """FlashInfer's prefill where its kernels cannot run (they run against
    float64 attention on a GPU: scripts/gpu_check.sh): records what the
    backend plans and runs."""

    def __init__(self):
        self.plans, self.runs = [], []

    def plan(self, batch, *shape):
        self.plans.append([(r.start, r.q_len, r.rects) for r in batch.rows])

    def run(self, batch, query, kv_cache, output):
        n = batch.offsets[-1] + batch.rows[-1].q_len
        self.runs.append(n)
        output[:n] = 1.0


def test_a_masked_step_on_flashinfer_computes_every_row_once(monkeypatch):
    """On the FlashInfer route, a step with masked rows is FlashInfer's
    alone: every request of the step, causal ones with a causal mask, planned
    once for all layers; vLLM's FlashAttention kernel (which would compute
    the masked rows first, to be overwritten) is never entered."""
    cfg = engine_config()
    worker_and_runner(cfg)
    layers = attention_layers(cfg)
    recorded = _RecordedFlashInfer()
    monkeypatch.setattr(attention, "flashinfer_prefill", lambda device, layout: recorded)
    monkeypatch.setattr(MaskedRowsImpl, "route", "flashinfer")
    impl = layers[0].impl
    heads, kv_heads, d = impl.num_heads, impl.num_kv_heads, impl.head_size
    rows = [MaskedRow(40, 1, ()), MaskedRow(0, 6, ((3, 6, 1, 3),)), MaskedRow(10, 1, ((10, 11, 2, 5),))]
    batch = MaskedBatch(rows, [0, 1, 7], [np.arange(4)] * 3, 16, masked=[1, 2])
    md = type("Metadata", (), {"multiverse_masks": batch})()  # what the runner attaches to vLLM's metadata
    kv_cache = torch.zeros(8, kv_heads, 16, 2 * d, dtype=torch.bfloat16)
    for layer in layers:
        query = torch.randn(8, heads, d, dtype=torch.bfloat16)
        output = torch.zeros(8, heads * d, dtype=torch.bfloat16)
        layer.impl.forward(layer, query, query, query, kv_cache, md, output)
        assert (output == 1).all()
    assert recorded.plans == [[(40, 1, ()), (0, 6, ((3, 6, 1, 3),)), (10, 1, ((10, 11, 2, 5),))]]
    assert recorded.runs == [8, 8]


def test_model_runner_v2_never_replays_a_full_graph_over_masked_rows(monkeypatch):
    """V2's graph manager, as ``initialize_kv_cache`` builds it for the
    H100's FULL_AND_PIECEWISE, with the Multiverse dispatch: a masked step
    of a size that has a full graph runs that size's piecewise graph."""
    from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment
    from vllm.v1.worker.gpu.cudagraph_utils import CudaGraphManager

    from vllm_multiverse.vllm032.runner_v2 import graph_manager_class

    cfg = engine_config()
    # A CUDA graph pool is a CUDA object; the dispatch never touches it.
    monkeypatch.setattr(current_platform, "get_global_graph_pool", lambda: None)
    with set_current_vllm_config(cfg):
        # The manager asks for its pipeline group: a one-process group, as
        # vLLM's worker makes for one GPU.
        init_distributed_environment(1, 0, "tcp://127.0.0.1:0", 0, backend="gloo")
        ensure_model_parallel_initialized(1, 1)
        manager = CudaGraphManager(cfg, torch.device("cpu"), cfg.compilation_config.cudagraph_mode, decode_query_len=1)
    manager.__class__ = graph_manager_class(CudaGraphManager)
    manager._graphs_captured = True  # what capture_model leaves
    plain = manager.dispatch(8, 8, 1, 0)
    assert plain.cg_mode == CUDAGraphMode.FULL
    manager.masked_step = True
    masked = manager.dispatch(8, 8, 1, 0)
    assert masked.cg_mode == CUDAGraphMode.PIECEWISE and masked.num_tokens == plain.num_tokens
    mixed = manager.dispatch(3, 8, None, 0, max_query_len=None)  # a prefill among decodes: never FULL anyway
    assert mixed.cg_mode != CUDAGraphMode.FULL
