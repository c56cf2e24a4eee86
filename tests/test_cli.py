"""`--plugin multiverse` and the `--multiverse-*` options on vLLM's own parser."""

import pytest


@pytest.fixture(scope="module")
def parse():
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from vllm_multiverse.vllm032.plugin import register

    register()
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())

    def parse(*argv):
        return AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", "m", *argv]))

    return parse


def test_options_land_in_additional_config(parse):
    args = parse("--plugin", "multiverse", "--multiverse-max-depth", "2", "--multiverse-sequential",
                 "--no-multiverse-parallel", "--multiverse-positions", "engine")
    assert args.additional_config["multiverse"] == {
        "max_depth": 2, "sequential": True, "parallel": False, "positions": "engine"
    }


def test_without_options_nothing_changes(parse):
    assert "multiverse" not in (parse().additional_config or {})
    assert "multiverse" not in (parse("--plugin", "multiverse").additional_config or {})


def test_options_merge_with_additional_config(parse):
    args = parse("--additional-config", '{"other": 1, "multiverse": {"max_depth": 3}}',
                 "--multiverse-max-paths-per-fork", "4")
    assert args.additional_config == {"other": 1, "multiverse": {"max_depth": 3, "max_paths_per_fork": 4}}


def test_unknown_plugin_name_is_an_error(parse):
    with pytest.raises(SystemExit):
        parse("--plugin", "other")
