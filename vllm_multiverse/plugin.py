"""The ``multiverse`` vLLM general plugin (entry point ``vllm.general_plugins``).

vLLM calls :func:`register` once in every process it starts (API server or
``LLM``, engine core, workers), so it must be idempotent and cheap. It wraps
``EngineArgs.create_engine_config`` so that an engine for a Multiverse model
(or one asked for with ``additional_config={"multiverse": {...}}``) gets the
Multiverse scheduler and worker; every other engine is left as it is. It
adds ``--plugin multiverse`` and the ``--multiverse-*`` options to vLLM's
command line (``vllm_multiverse/cli.py``). On
CPU it also registers the Multiverse attention backend, which is vLLM's CPU
attention wherever a step has nothing to mask.
"""

from __future__ import annotations

from vllm_multiverse.log import init_logger

logger = init_logger(__name__)

_registered = False
CPU_ATTENTION_BACKEND = "vllm_multiverse.engine.attention.MultiverseCPUAttentionBackend"


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    from vllm.engine.arg_utils import EngineArgs

    from vllm_multiverse import __version__
    from vllm_multiverse.engine.wiring import configure_engine

    original = EngineArgs.create_engine_config

    def create_engine_config(self, *args, **kwargs):
        config = original(self, *args, **kwargs)
        configure_engine(config)
        return config

    EngineArgs.create_engine_config = create_engine_config
    _add_cli_options(EngineArgs)
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        # Before any model is built in this process; without masks it is
        # vLLM's own CPU attention.
        from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

        register_backend(AttentionBackendEnum.CPU_ATTN, CPU_ATTENTION_BACKEND)
    logger.info("vllm-multiverse %s plugin loaded", __version__)


def _add_cli_options(EngineArgs) -> None:
    """``--plugin multiverse`` and ``--multiverse-*`` on vLLM's parsers."""
    from vllm_multiverse import cli

    add_cli_args = EngineArgs.add_cli_args
    from_cli_args = EngineArgs.from_cli_args.__func__

    def add_cli_args_with_multiverse(parser, *args, **kwargs):
        return cli.add_cli_args(add_cli_args(parser, *args, **kwargs))

    def from_cli_args_with_multiverse(cls, args):
        engine_args = from_cli_args(cls, args)
        options = cli.options_from_args(args)
        if options:
            engine_args.additional_config = cli.merge_into(engine_args.additional_config, options)
        return engine_args

    EngineArgs.add_cli_args = staticmethod(add_cli_args_with_multiverse)
    EngineArgs.from_cli_args = classmethod(from_cli_args_with_multiverse)
