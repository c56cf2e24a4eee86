"""vLLM (the installed CPU build) discovers the `multiverse` general plugin
through its entry point and calls register()."""

import os
import subprocess
import sys

SCRIPT = """
import logging
logging.basicConfig(level=logging.INFO)
from vllm.plugins import load_general_plugins
load_general_plugins()
"""


def _run(env_extra):
    env = {**os.environ, **env_extra}
    env.pop("VLLM_PLUGINS", None) if "VLLM_PLUGINS" not in env_extra else None
    return subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )


def test_vllm_loads_the_plugin():
    res = _run({})
    assert res.returncode == 0, res.stderr
    assert "vllm-multiverse" in res.stderr and "plugin loaded" in res.stderr


def test_vllm_plugins_allow_list_excludes_it():
    res = _run({"VLLM_PLUGINS": "lora_filesystem_resolver"})
    assert res.returncode == 0, res.stderr
    assert "plugin loaded" not in res.stderr
    res = _run({"VLLM_PLUGINS": "multiverse"})
    assert "plugin loaded" in res.stderr
