"""scripts/vllm_touch_points.py: the list a port to another vLLM starts from.

Checked on the installed vLLM (everything the plugin touches is there) and
on a copy of it with three changes of the kinds a release makes (a method
renamed, a field dropped, an attribute renamed), which it must name."""

import importlib.util
import re
import shutil
import sys
from pathlib import Path

import pytest
import vllm

ROOT = Path(__file__).resolve().parents[1]
INSTALLED = Path(vllm.__file__).parent


@pytest.fixture(scope="module")
def touch_points():
    spec = importlib.util.spec_from_file_location("vllm_touch_points", ROOT / "scripts" / "vllm_touch_points.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def layer(touch_points):
    return touch_points.read_layer()


def _rows(touch_points, layer, target: Path) -> dict[tuple[str, str], tuple[str, str]]:
    findings = touch_points.compare(layer, touch_points.Tree(INSTALLED), touch_points.Tree(target))
    return {(f.kind, f.symbol): (f.status, f.detail) for f in findings}


def test_everything_the_plugin_touches_is_in_the_installed_vllm(touch_points, layer):
    rows = _rows(touch_points, layer, INSTALLED)
    assert {status for status, _ in rows.values()} == {"same"}
    # The list covers each kind, with the touch points the plugin is built on.
    assert ("override", "vllm.v1.core.sched.scheduler.Scheduler._update_request_with_output") in rows
    assert ("override", "vllm.v1.worker.gpu_model_runner.GPUModelRunner._prepare_inputs") in rows
    assert ("patch", "vllm.engine.arg_utils.EngineArgs.create_engine_config") in rows
    assert ("import", "vllm.v1.core.sched.output.SchedulerOutput") in rows
    assert ("attribute", "resumed_req_ids") in rows


def _edit(copy: Path, rel: str, old: str, new: str) -> None:
    path = copy / rel
    text = path.read_text()
    assert re.search(old, text), f"{old!r} not in {rel}: the installed vLLM changed, update this test"
    path.unlink()  # a symlink into the installed tree: replace, never write through it
    path.write_text(re.sub(old, new, text))


def test_a_release_that_renames_what_the_plugin_uses_is_reported(touch_points, layer, tmp_path):
    copy = tmp_path / "vllm"
    shutil.copytree(INSTALLED, copy, symlinks=True, copy_function=lambda src, dst: Path(dst).symlink_to(src),
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    _edit(copy, "v1/core/sched/scheduler.py", r"def _free_request_blocks\(", "def _release_request_blocks(")
    _edit(copy, "v1/core/sched/output.py", r"\n\s*resumed_req_ids: [^\n]*", "")
    _edit(copy, "v1/request.py", r"skip_reading_prefix_cache", "prefix_cache_hit_limit")
    _edit(copy, "v1/engine/__init__.py", r"\n(\s+)num_nans_in_logits: int = 0",
          r"\n\1num_nans_in_logits: int = 0\n\1watermark: int = 0")
    rows = _rows(touch_points, layer, copy)
    flagged = {key: value for key, value in rows.items() if value[0] != "same"}
    assert flagged.pop(("override", "vllm.v1.core.sched.scheduler.Scheduler._free_request_blocks")) == (
        "missing", "method gone")
    assert flagged.pop(("attribute", "resumed_req_ids"))[0] == "missing"
    assert flagged.pop(("attribute", "skip_reading_prefix_cache")) == ("changed", "no longer in v1/request.py")
    assert flagged.pop(("import", "vllm.v1.engine.EngineCoreOutput")) == ("changed", "+watermark")
    assert flagged == {}
