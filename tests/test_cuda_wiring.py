"""The CUDA path's device-independent parts on this CPU build of vLLM 0.32:
the runner and backend classes against vLLM's own, the masked-rows route,
the position patch and the masked batch's block arithmetic. vLLM's CUDA
platform itself runs with the plugin in tests/test_cuda_platform.py."""

import inspect
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from vllm.v1.attention.backends.registry import AttentionBackendEnum

from vllm_multiverse.kernels.masked_attention import MaskedBatch
from vllm_multiverse.vllm032 import attention, validate
from vllm_multiverse.vllm032.attention import MaskedRowsImpl
from vllm_multiverse.vllm032.runner import MultiverseCudagraphDispatcher, MultiverseRunnerMixin
from vllm_multiverse.vllm032.step_inputs import position_deltas
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


# FLASHINFER's module imports only where FlashInfer does: tests/cuda_platform.
@pytest.mark.parametrize("name", ["CPU_ATTN", "FLASH_ATTN", "TRITON_ATTN"])
def test_each_backend_is_vllms_own_with_the_masked_rows(name):
    import importlib

    from vllm.utils.import_utils import resolve_obj_by_qualname

    module, backend_name, impl_name = attention.BACKENDS[name]
    mod = importlib.import_module(module)
    backend = getattr(attention, f"Multiverse_{name}")
    assert issubclass(backend, getattr(mod, backend_name))
    assert backend.get_name() == getattr(mod, backend_name).get_name() == name
    impl = backend.get_impl_cls()
    assert issubclass(impl, getattr(mod, impl_name)) and issubclass(impl, MaskedRowsImpl)
    assert impl.forward is MaskedRowsImpl.forward
    assert getattr(attention, f"Multiverse_{name}") is backend
    # The path vLLM's CUDA selector makes of the class resolves to it again.
    assert resolve_obj_by_qualname(".".join(backend.full_cls_name())) is backend
    with pytest.raises(AttributeError):
        attention.Multiverse_NOT_A_BACKEND  # noqa: B018


def test_register_points_vllms_entries_at_the_subclasses():
    from vllm.v1.attention.backends.registry import _ATTN_OVERRIDES

    saved = dict(_ATTN_OVERRIDES)
    try:
        attention.register(platform_is_cpu=False)
        for name in attention.CUDA_BACKENDS:
            assert AttentionBackendEnum[name].get_path() == f"vllm_multiverse.vllm032.attention.Multiverse_{name}"
    finally:
        _ATTN_OVERRIDES.clear()
        _ATTN_OVERRIDES.update(saved)


@pytest.mark.parametrize(
    "requested,platform,installed,refused",
    [
        ("auto", "cuda", True, False),
        ("auto", "cuda", False, False),
        ("sdpa", "cuda", True, False),
        ("flashinfer", "cuda", True, False),
        ("flashinfer", "cuda", False, True),
        ("auto", "cpu", True, False),
        ("flashinfer", "cpu", True, True),
    ],
)
def test_a_masked_route_that_cannot_be_had_is_refused(requested, platform, installed, refused):
    if refused:
        with pytest.raises(MultiverseConfigError, match="--multiverse-masked-attention flashinfer"):
            validate.check_masked_route(requested, platform, installed)
    else:
        validate.check_masked_route(requested, platform, installed)


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
            req_ids=["a", "b", "c"],
            block_table=[SimpleNamespace(block_size=block_size, block_table=SimpleNamespace(np=table))],
        ),
        _kernel_block_sizes=[kernel_block],
    )
    batch = MultiverseRunnerMixin._masked_batch(runner, {"a": [(0, 1, 0, 1)], "c": []})
    assert isinstance(batch, MaskedBatch) and batch.page_size == kernel_block
    # Every request of the step (the whole-step routes take them all), two masked.
    assert batch.offsets == [0, 4, 5] and list(batch.masked) == [0, 2]
    a, b, c = batch.rows
    assert (a.start, a.q_len, a.kv_len, a.rects) == (2 * block_size + 3 - 4, 4, 2 * block_size + 3, ((0, 1, 0, 1),))
    assert (b.start, b.q_len, b.rects) == (8, 1, ())
    assert (c.start, c.q_len) == (block_size + 1 - 3, 3)
    split = block_size // kernel_block
    for i, blocks in ((0, [5, 2, 7]), (2, [1, 4])):
        got, row = batch.block_ids[i], batch.rows[i]
        want = [b * split + j for b in blocks for j in range(split)]
        assert got.tolist() == want
        # Token t of the row is in kernel block want[t // kernel_block].
        assert len(want) * kernel_block >= row.kv_len
