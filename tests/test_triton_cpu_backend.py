"""The test Triton backend (``tests/triton_cpu``) runs vLLM's Model Runner V2
on this CPU: a stock engine (plugin off) decodes the same tokens on V2 as on
V1. The ground the Model Runner V2 port stands on; slow (two engines, and
Triton's interpreter)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LLM_DEFAULTS, TINY_MODEL

ROOT = Path(__file__).resolve().parents[1]

_DECODE = """
import json, sys
from vllm import LLM, SamplingParams

if __name__ == "__main__":
    llm = LLM(**json.loads(sys.argv[1]))
    outs = llm.generate(json.loads(sys.argv[2]), SamplingParams(temperature=0, max_tokens=60))
    print("RESULT " + json.dumps([o.outputs[0].token_ids for o in outs]))
"""
PROMPTS = ["Start at 49 and add 4 seven times.", "Start at 12 and add k seven times, for k = 1 to 3."]


def _decode(v2: bool, tmp_path: Path) -> tuple[list[list[int]], str]:
    env = os.environ.copy()
    paths = [str(ROOT / "tests" / "triton_cpu")] if v2 else []
    env["PYTHONPATH"] = os.pathsep.join([*paths, str(ROOT)])
    env["TRITON_INTERPRET"] = "1" if v2 else "0"
    env["VLLM_USE_V2_MODEL_RUNNER"] = "1" if v2 else "0"
    script = tmp_path / "decode.py"  # run as __main__: vLLM's engine core is a spawned process
    script.write_text(_DECODE)
    args = LLM_DEFAULTS | {"model": str(TINY_MODEL), "additional_config": {"multiverse": {"enabled": False}}}
    run = subprocess.run([sys.executable, str(script), json.dumps(args), json.dumps(PROMPTS)], env=env,
                         capture_output=True, text=True, timeout=600)
    line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, run.stderr[-3000:]
    return json.loads(line.removeprefix("RESULT ")), run.stdout + run.stderr


@pytest.mark.slow
def test_stock_vllm_runs_model_runner_v2_on_this_cpu(tmp_path):
    v1, log1 = _decode(False, tmp_path)
    v2, log2 = _decode(True, tmp_path)
    assert "Using V2 Model Runner" in log2 and "Using V2 Model Runner" not in log1
    assert all(len(t) > 10 for t in v1)
    assert v2 == v1
