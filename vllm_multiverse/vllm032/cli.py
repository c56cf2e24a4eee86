"""The plugin's command-line options for ``vllm serve`` (and every vLLM
command that takes engine arguments).

vLLM has no ``--plugin`` flag, but it loads general plugins before it builds
its argument parser; the plugin then adds ``--plugin multiverse`` (accepted
for readability: the plugin is already loaded when it is parsed) and one
``--multiverse-<option>`` per field of :class:`MultiverseConfig`, which land
in ``additional_config["multiverse"]`` exactly as from Python.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import TYPE_CHECKING, Any

from vllm_multiverse.config import ADDITIONAL_CONFIG_KEY, MultiverseConfig

if TYPE_CHECKING:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

PREFIX = "multiverse_"
# Set by the engine itself from vLLM's enable_prefix_caching.
_INTERNAL = {"prefix_caching"}

_HELP = {
    "enabled": "Multiverse decoding on or off (default: on for Multiverse models: a config.json['multiverse'] "
    "declaration, or the twelve tags as special tokens in the tokenizer).",
    "positions": "Position convention (default: the one the model declares).",
    "max_paths_per_fork": "Paths of one fork run in parallel up to this many; beyond, one after another.",
    "max_depth": "Nesting depth of forks run in parallel; deeper blocks run their Paths one after another.",
    "max_branches_per_request": "Branches decoding beside their siblings per client request (its n children "
    "together); beyond, Paths run one after another.",
    "parallel": "Paths as parallel branches (--no-multiverse-parallel: one after another, a baseline).",
    "sequential": "No branches: Paths one after another in one sequence, masked (same tokens).",
    "max_outlines": "Outlines per Goal beyond which a block is treated as plain text.",
    "max_nesting": "Nesting beyond which a block is treated as plain text.",
    "masked_attention": "CUDA: how rows under a Multiverse mask are recomputed (FlashInfer's masked paged "
    "prefill, or SDPA over the gathered KV for debugging; default: FlashInfer where installed).",
}


def _fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(MultiverseConfig) if f.name not in _INTERNAL]


def add_cli_args(parser: FlexibleArgumentParser) -> FlexibleArgumentParser:
    group = parser.add_argument_group("Multiverse", "vllm-multiverse plugin options (additional_config['multiverse']).")
    group.add_argument(
        "--plugin",
        action="append",
        choices=["multiverse"],
        default=None,
        help="Accepted for `vllm serve MODEL --plugin multiverse`; the plugin is loaded by "
        "vLLM's plugin mechanism (VLLM_PLUGINS).",
    )
    hints = typing.get_type_hints(MultiverseConfig)
    for f in _fields():
        flag = "--" + (PREFIX + f.name).replace("_", "-")
        kind = hints[f.name]
        args = typing.get_args(kind)
        if kind is bool or bool in args:
            group.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=_HELP[f.name]
            )
        elif kind is int:
            group.add_argument(flag, type=int, default=argparse.SUPPRESS, help=f"{_HELP[f.name]} Default: {f.default}.")
        else:
            choices = list(args) if typing.get_origin(kind) is typing.Literal else None
            choices = choices or [c for a in args for c in typing.get_args(a)] or None
            group.add_argument(flag, choices=choices, default=argparse.SUPPRESS, help=_HELP[f.name])
    return parser


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The --multiverse-* options the user set."""
    return {
        f.name: getattr(args, PREFIX + f.name) for f in _fields() if getattr(args, PREFIX + f.name, None) is not None
    }


def with_options(engine_args: EngineArgs, args: argparse.Namespace) -> EngineArgs:
    """``EngineArgs.from_cli_args`` (patches.py): the --multiverse-* options
    into ``additional_config["multiverse"]``, beside what it already holds."""
    options = options_from_args(args)
    if options:
        cfg = dict(engine_args.additional_config or {})
        cfg[ADDITIONAL_CONFIG_KEY] = {**cfg.get(ADDITIONAL_CONFIG_KEY, {}), **options}
        engine_args.additional_config = cfg
    return engine_args
