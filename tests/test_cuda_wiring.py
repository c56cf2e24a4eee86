"""The CUDA path's device-independent parts, on this CPU build of vLLM 0.32:
the runner and backend classes against vLLM's own, the runner choice, the
masked-rows route, the CUDA-graph dispatch of masked steps, the position
patch and the masked batch's block arithmetic."""

import inspect
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from vllm.config import CompilationMode, CUDAGraphMode, VllmConfig
from vllm.v1.attention.backends.registry import AttentionBackendEnum

from vllm_multiverse.kernels.masked_attention import MaskedBatch
from vllm_multiverse.vllm032 import attention, validate, wiring
from vllm_multiverse.vllm032.attention import MaskedRowsImpl
from vllm_multiverse.vllm032.runner import MultiverseCudagraphDispatcher, MultiverseRunnerMixin, position_deltas
from vllm_multiverse.vllm032.validate import MultiverseConfigError

TINY = Path(__file__).resolve().parents[1] / "models" / "multiverse-tiny"


def test_gpu_runner_and_worker_are_vllms_v1_classes_with_the_shared_hooks():
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    from vllm_multiverse.vllm032.cpu.worker import MultiverseCPUModelRunner
    from vllm_multiverse.vllm032.cuda.worker import MultiverseGPUModelRunner, MultiverseGPUWorker

    assert issubclass(MultiverseGPUWorker, Worker) and "_make_model_runner" in vars(Worker)
    hooks = ("load_model", "_update_states", "_prepare_inputs", "_build_attention_metadata")
    for runner, base in ((MultiverseGPUModelRunner, GPUModelRunner), (MultiverseCPUModelRunner, CPUModelRunner)):
        assert issubclass(runner, base) and issubclass(base, GPUModelRunner)
        for hook in hooks:
            # The CPU and CUDA runners run the same hook code.
            assert getattr(runner, hook) is getattr(MultiverseRunnerMixin, hook)
            assert hook in vars(GPUModelRunner), hook
    params = inspect.signature(GPUModelRunner._prepare_inputs).parameters
    assert list(params)[1:] == ["scheduler_output", "num_scheduled_tokens"]
    assert "invalid_modes" in inspect.signature(MultiverseCudagraphDispatcher.__mro__[1].dispatch).parameters


def _installed(name):
    module, _, _ = attention.BACKENDS[name]
    try:
        __import__(module)
    except ImportError as e:
        pytest.skip(f"{module} does not import here: {e}")


@pytest.mark.parametrize("name", sorted(attention.BACKENDS))
def test_each_backend_is_vllms_own_with_the_masked_rows(name):
    import importlib

    _installed(name)
    module, backend_name, impl_name = attention.BACKENDS[name]
    mod = importlib.import_module(module)
    backend = getattr(attention, f"Multiverse_{name}")
    assert issubclass(backend, getattr(mod, backend_name))
    assert backend.get_name() == getattr(mod, backend_name).get_name() == name
    impl = backend.get_impl_cls()
    assert issubclass(impl, getattr(mod, impl_name)) and issubclass(impl, MaskedRowsImpl)
    assert impl.forward is MaskedRowsImpl.forward
    assert getattr(attention, f"Multiverse_{name}") is backend
    with pytest.raises(AttributeError):
        attention.Multiverse_NOT_A_BACKEND  # noqa: B018


def test_register_points_vllms_entries_at_the_subclasses():
    from vllm.v1.attention.backends.registry import _ATTN_OVERRIDES

    saved = dict(_ATTN_OVERRIDES)
    try:
        attention.register(platform_is_cpu=False, route="sdpa")
        for name in attention.CUDA_BACKENDS:
            assert AttentionBackendEnum[name].get_path() == f"vllm_multiverse.vllm032.attention.Multiverse_{name}"
        assert MaskedRowsImpl.route == "sdpa"
    finally:
        _ATTN_OVERRIDES.clear()
        _ATTN_OVERRIDES.update(saved)


@pytest.mark.parametrize(
    "requested,platform,installed,want",
    [
        ("auto", "cuda", True, "flashinfer"),
        ("auto", "cuda", False, "sdpa"),
        ("sdpa", "cuda", True, "sdpa"),
        ("flashinfer", "cuda", True, "flashinfer"),
        ("flashinfer", "cuda", False, None),
        ("auto", "cpu", True, "sdpa"),
        ("flashinfer", "cpu", True, None),
    ],
)
def test_masked_route(requested, platform, installed, want):
    if want is None:
        with pytest.raises(MultiverseConfigError):
            wiring.masked_route(requested, platform, installed)
    else:
        assert wiring.masked_route(requested, platform, installed) == want


def _config(use_v2, additional=None):
    hf = SimpleNamespace(**{"multiverse": json.loads((TINY / "config.json").read_text())["multiverse"]})
    return SimpleNamespace(
        use_v2_model_runner=use_v2,
        additional_config=additional or {},
        model_config=SimpleNamespace(hf_config=hf, model=str(TINY)),
    )


def test_runner_choice_on_cuda(monkeypatch):
    monkeypatch.setattr(wiring, "platform_name", lambda: "cuda")
    monkeypatch.delenv(wiring.V2_ENV, raising=False)
    assert wiring.wants_v1_runner(_config(use_v2=True))
    assert not wiring.wants_v1_runner(_config(use_v2=False))
    assert not wiring.wants_v1_runner(_config(use_v2=True, additional={"multiverse": {"enabled": False}}))
    monkeypatch.setenv(wiring.V2_ENV, "1")
    with pytest.raises(MultiverseConfigError, match="Model Runner V2"):
        wiring.wants_v1_runner(_config(use_v2=True))
    monkeypatch.setattr(wiring, "platform_name", lambda: "cpu")
    assert not wiring.wants_v1_runner(_config(use_v2=True))


@pytest.mark.parametrize(
    "dtype,v2,backend,refused",
    [
        (torch.bfloat16, False, None, None),
        (torch.float16, False, "FLASHINFER", None),
        (torch.float32, False, None, "float32 on CUDA"),
        (torch.bfloat16, True, None, "Model Runner V2"),
        (torch.bfloat16, False, "FLEX_ATTENTION", "attention backend FLEX_ATTENTION"),
    ],
)
def test_cuda_start_up_checks(dtype, v2, backend, refused):
    cfg = SimpleNamespace(
        model_config=SimpleNamespace(dtype=dtype),
        use_v2_model_runner=v2,
        attention_config=SimpleNamespace(backend=AttentionBackendEnum[backend] if backend else None),
    )
    if refused is None:
        validate._check_cuda(cfg)
    else:
        with pytest.raises(MultiverseConfigError, match=refused):
            validate._check_cuda(cfg)


def test_a_masked_step_never_replays_a_full_cuda_graph():
    vc = VllmConfig()
    c = vc.compilation_config
    # What vLLM sets up on CUDA (FULL_AND_PIECEWISE, attention split out).
    c.mode, c.splitting_ops = CompilationMode.VLLM_COMPILE, list(c._attention_ops)
    c.cudagraph_mode, c.cudagraph_capture_sizes, c.max_cudagraph_capture_size = (
        CUDAGraphMode.FULL_AND_PIECEWISE, [1, 2, 4, 8], 8
    )
    d = MultiverseCudagraphDispatcher(vc)
    d.initialize_cudagraph_keys(CUDAGraphMode.FULL_AND_PIECEWISE, 1)
    assert d.dispatch(num_tokens=4, uniform_decode=True)[0] == CUDAGraphMode.FULL
    d.masked_step = True
    assert d.dispatch(num_tokens=4, uniform_decode=True)[0] == CUDAGraphMode.PIECEWISE
    assert d.dispatch(num_tokens=4, uniform_decode=False)[0] == CUDAGraphMode.PIECEWISE
    assert d.dispatch(num_tokens=4, uniform_decode=True, valid_modes={CUDAGraphMode.NONE})[0] == CUDAGraphMode.NONE


def test_position_deltas():
    # Three requests of 2, 3 and 1 scheduled tokens; seq_lens after the step.
    qsl, seq_lens = np.array([0, 2, 5, 6]), np.array([10, 3, 7])
    positions = {"b": [0, 1, 1], "c": 4}
    delta = position_deltas(positions, ["a", "b", "c"], qsl, seq_lens, 6)
    index = np.array([8, 9, 0, 1, 2, 6])
    want = np.array([8, 9, 0, 1, 1, 2])
    assert (index - delta).tolist() == want.tolist()
    assert position_deltas({}, ["a"], qsl, seq_lens, 6) is None


@pytest.mark.parametrize("block_size,kernel_block", [(16, 16), (64, 16), (32, 8)])
def test_masked_batch_counts_kernel_blocks(block_size, kernel_block):
    table = np.zeros((3, 8), dtype=np.int32)
    table[0, :3], table[2, :2] = [5, 2, 7], [1, 4]
    runner = SimpleNamespace(
        query_start_loc=SimpleNamespace(np=np.array([0, 4, 5, 8])),
        optimistic_seq_lens_cpu=torch.tensor([2 * block_size + 3, 9, block_size + 1]),
        input_batch=SimpleNamespace(
            req_ids=["a", "b", "c"], block_table=[SimpleNamespace(block_size=block_size, block_table=SimpleNamespace(np=table))]
        ),
        _kernel_block_sizes=[kernel_block],
    )
    batch = MultiverseRunnerMixin._masked_batch(runner, {"a": [(0, 1, 0, 1)], "c": []})
    assert isinstance(batch, MaskedBatch) and batch.page_size == kernel_block
    assert batch.offsets == [0, 5]
    a, c = batch.rows
    assert (a.start, a.q_len, a.kv_len, a.rects) == (2 * block_size + 3 - 4, 4, 2 * block_size + 3, ((0, 1, 0, 1),))
    assert (c.start, c.q_len) == (block_size + 1 - 3, 3)
    split = block_size // kernel_block
    for got, blocks, row in zip(batch.block_ids, ([5, 2, 7], [1, 4]), batch.rows):
        want = [b * split + j for b in blocks for j in range(split)]
        assert got.tolist() == want
        # Token t of the row is in kernel block want[t // kernel_block].
        assert len(want) * kernel_block >= row.kv_len
