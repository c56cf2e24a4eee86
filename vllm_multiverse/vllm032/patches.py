"""Every place the plugin reaches into vLLM 0.32.0 beyond its official hooks
(the ``vllm.general_plugins`` and ``vllm.stat_logger_plugins`` entry points,
``scheduler_cls``/``worker_cls``, ``register_backend``), each with why, and
the only code that makes those changes. A port to another vLLM starts from
this list and from ``scripts/vllm_touch_points.py``, which finds every vLLM
symbol, override and attribute the layer uses and checks them against the
new release.

Methods wrapped, once per process (:func:`install`):

1. ``EngineArgs.create_engine_config``: an engine for a Multiverse model gets
   the Multiverse scheduler and worker after its refusals, and on CUDA the V1
   runner (``wiring.create_engine_config``). vLLM builds engine configs in
   several places (``LLM``, ``vllm serve``, Ray Serve LLM); this is where they
   all pass.
2. ``EngineArgs.add_cli_args`` and ``EngineArgs.from_cli_args``:
   ``--plugin multiverse`` and ``--multiverse-*`` on vLLM's own parsers
   (``cli.py``), which have no plugin hook.
3. ``InputProcessor.process_inputs``: the per-request refusals, after the
   model's generation-config defaults are applied, and each request tagged
   with its client request (``per_request.py``).
4. ``AsyncLLM._add_streaming_input_request``: streaming-input requests
   refused before their stream is read, not inside its task.

Classes swapped on an object vLLM built with no hook to choose the class:

5. the CPU worker's model runner (``CPUWorker`` builds it inline) becomes the
   Multiverse CPU runner (:func:`use_runner_class`);
6. the V1 runner's CUDA-graph dispatcher (built in ``GPUModelRunner.__init__``)
   becomes :class:`~vllm_multiverse.vllm032.runner.MultiverseCudagraphDispatcher`
   (:func:`use_dispatcher_class`);
6a. Model Runner V2's model state (built in ``load_model`` by
   ``init_model_state``) and CUDA-graph manager (built in
   ``initialize_kv_cache``) become their classes with the Multiverse
   mixins of ``runner_v2.py`` (:func:`use_model_state_class`,
   :func:`use_graph_manager_class`). Patching ``DefaultModelState`` itself
   would miss models that bring their own state class.

Attributes added to vLLM's objects:

7. ``SchedulerOutput.multiverse``: the step's ``MultiverseStep``, pickled to
   every worker with the rest (:func:`send_step`, :func:`received_step`);
8. the attention metadata's ``multiverse_masks``: the step's ``MaskedBatch``,
   read by every layer (:func:`attach_masked_batch`, :func:`masked_batch`);
9. ``hf_config.multiverse``: a declaration derived from the tokenizer, where
   ``config.json`` has none, where the scheduler and workers read it
   (:func:`store_declaration`);
10. ``SchedulerStats.waiting_lora_adapters`` carries the scheduler's counters
    from the engine core to the API server's stat logger, under keys no
    adapter can have: vLLM has no field for a plugin's figures and reads that
    dict only when LoRA is on (:func:`attach_totals`, :func:`take_totals`);
11. ``SamplingParams.extra_args["multiverse_client"]``: the client request a
    request serves (``per_request.CLIENT_ARG``), which ``n > 1`` siblings share.

Private methods the plugin's subclasses override (vLLM's own code path,
changed in place): ``Scheduler._update_request_with_output``,
``_free_request_blocks``, ``_preempt_request``; ``GPUModelRunner._update_states``,
``_prepare_inputs``, ``_build_attention_metadata``; Model Runner V2's
``GPUModelRunner.update_requests``, ``initialize_kv_cache``, ``execute_model``,
its model state's ``prepare_inputs``, ``prepare_dummy_inputs``,
``prepare_attn`` and its graph manager's ``dispatch`` (reading its
``_candidates``); ``CPUModelRunner._sample``,
``_bookkeeping_sync``; ``Worker._make_model_runner``; and ``kv.py`` reads the
KV cache manager's ``coordinator.single_type_managers[0]`` tables.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.metrics.stats import SchedulerStats

    from vllm_multiverse.kernels.masked_attention import MaskedBatch
    from vllm_multiverse.tree import MultiverseStep

_installed = False


def installed() -> bool:
    return _installed


def install() -> None:
    """Patches 1-4, once per process (vLLM loads general plugins in every
    process it starts, and some processes more than once)."""
    global _installed
    if _installed:
        return
    _installed = True
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.input_processor import InputProcessor

    from vllm_multiverse.vllm032 import cli, per_request, wiring

    _wrap(EngineArgs, "create_engine_config", wiring.create_engine_config)
    add_cli_args = EngineArgs.add_cli_args
    from_cli_args = EngineArgs.from_cli_args.__func__
    EngineArgs.add_cli_args = staticmethod(lambda parser, *a, **kw: cli.add_cli_args(add_cli_args(parser, *a, **kw)))
    EngineArgs.from_cli_args = classmethod(
        lambda cls, args: cli.with_options(from_cli_args(cls, args), args)
    )
    _wrap(InputProcessor, "process_inputs", per_request.process_inputs)
    _wrap(AsyncLLM, "_add_streaming_input_request", per_request.add_streaming_input_request)


def _wrap(cls: type, name: str, hook: Callable[..., Any]) -> None:
    """``cls.name`` becomes ``hook(original, self, *args, **kwargs)``
    (awaited where the original is a coroutine function)."""
    original = getattr(cls, name)
    if inspect.iscoroutinefunction(original):

        async def patched(self: Any, *args: Any, **kwargs: Any) -> Any:
            return await hook(original, self, *args, **kwargs)

    else:

        def patched(self: Any, *args: Any, **kwargs: Any) -> Any:
            return hook(original, self, *args, **kwargs)

    setattr(cls, name, functools.wraps(original)(patched))


def use_runner_class(worker: Any, runner_cls: type) -> None:
    """Patch 5: the CPU worker's runner, built inline, becomes ``runner_cls``
    (a subclass with no state of its own)."""
    worker.model_runner.__class__ = runner_cls


def use_dispatcher_class(runner: Any, dispatcher_cls: type) -> None:
    """Patch 6: the runner's CUDA-graph dispatcher becomes ``dispatcher_cls``."""
    runner.cudagraph_dispatcher.__class__ = dispatcher_cls


def use_model_state_class(runner: Any, state_cls: type) -> None:
    """Patch 6a: the V2 runner's model state becomes ``state_cls``."""
    runner.model_state.__class__ = state_cls


def use_graph_manager_class(runner: Any, manager_cls: type) -> None:
    """Patch 6a: the V2 runner's CUDA-graph manager becomes ``manager_cls``."""
    runner.cudagraph_manager.__class__ = manager_cls


def send_step(scheduler_output: SchedulerOutput, step: MultiverseStep) -> None:
    """Patch 7, scheduler side."""
    scheduler_output.multiverse = step


def received_step(scheduler_output: SchedulerOutput) -> MultiverseStep | None:
    """Patch 7, worker side: None where a step arrived without it."""
    return getattr(scheduler_output, "multiverse", None)


def attach_masked_batch(metadata: Any, batch: MaskedBatch) -> None:
    """Patch 8, runner side."""
    metadata.multiverse_masks = batch


def masked_batch(metadata: Any) -> MaskedBatch | None:
    """Patch 8, backend side: None for a step with nothing to mask."""
    return getattr(metadata, "multiverse_masks", None)


def store_declaration(hf_config: Any, entry: Mapping[str, Any]) -> None:
    """Patch 9."""
    from vllm_multiverse.model_config import CONFIG_KEY

    setattr(hf_config, CONFIG_KEY, entry)


_TOTALS = "vllm-multiverse/"  # a LoRA adapter name never holds a slash here


def attach_totals(stats: SchedulerStats, totals: Mapping[str, int]) -> None:
    """Patch 10, engine core: the scheduler's running totals on ``stats``."""
    stats.waiting_lora_adapters.update({_TOTALS + k: int(v) for k, v in totals.items()})


def take_totals(stats: SchedulerStats) -> dict[str, int]:
    """Patch 10, API server: the totals taken off ``stats`` (before vLLM's
    loggers see them)."""
    carrier = stats.waiting_lora_adapters
    keys = [k for k in carrier if k.startswith(_TOTALS)]
    return {k[len(_TOTALS) :]: carrier.pop(k) for k in keys}
