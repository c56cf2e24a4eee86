"""csrc/ compiles: every .cu with a bare nvcc (no torch) for sm_80 and sm_90,
torch_bindings.cpp syntax-only against torch's headers as the extension
build sees them, and the op schemas it registers take the arguments that
vllm_multiverse/kernels passes. All compiles run at once, in threads."""

from __future__ import annotations

import concurrent.futures
import functools
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension
from kernel_cases import CSRC, find_nvcc

CU_FILES = sorted(p.name for p in CSRC.glob("*.cu"))
ARCHS = ("80", "90")
BINDINGS = CSRC / "torch_bindings.cpp"


def cuda_include(nvcc: str) -> Path | None:
    """The toolkit's include folder (nvcc may be a wrapper script elsewhere)."""
    candidates = [Path(nvcc).resolve().parent.parent / "include"]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(Path(home) / "include")
    out = subprocess.run(
        [nvcc, "--dryrun", "-c", "x.cu"], check=False, capture_output=True, text=True
    )
    candidates += [Path(p) for p in re.findall(r'INCLUDES="-I"?([^" ]+)', out.stdout + out.stderr)]
    return next((c for c in candidates if (c / "cuda_runtime_api.h").exists()), None)


NVCC = find_nvcc()
needs_nvcc = pytest.mark.skipif(
    NVCC is None, reason="nvcc not found (set CUDA_HOME or put it on PATH)"
)


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=CSRC, timeout=300)


def _nvcc_cmd(name: str, arch: str, out_dir: Path) -> list[str]:
    out = out_dir / f"{name}.sm{arch}.o"
    return [
        NVCC,
        "-c",
        "-std=c++17",
        "-O2",
        "-gencode",
        f"arch=compute_{arch},code=sm_{arch}",
        name,
        "-o",
        str(out),
    ]


def bindings_cmd() -> tuple[list[str] | None, str]:
    """g++ -fsyntax-only on torch_bindings.cpp, or (None, why not)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        return None, "no C++ compiler"
    torch_inc = [Path(p) for p in torch.utils.cpp_extension.include_paths()]
    needed = [
        "c10/cuda/CUDAGuard.h",
        "c10/cuda/CUDAStream.h",
        "c10/cuda/CUDAException.h",
        "torch/library.h",
    ]
    missing = [h for h in needed if not any((d / h).exists() for d in torch_inc)]
    if missing:
        return None, f"torch {torch.__version__} ships without {', '.join(missing)}"
    cuda_inc = cuda_include(NVCC)
    if cuda_inc is None or not (cuda_inc / "cuda.h").exists():
        return None, "no CUDA toolkit headers (cuda_runtime_api.h, cuda.h) found"
    python_inc = Path(sysconfig.get_paths()["include"])
    if not (python_inc / "Python.h").exists():
        return None, f"no Python.h in {python_inc}"
    flags = ["-fsyntax-only", "-std=c++20", "-DTORCH_EXTENSION_NAME=_C"]
    # A CPU wheel has c10/cuda's headers but not the one CMake generates
    # (export macros of Windows DLLs); this define skips its include.
    if not any((d / "c10/cuda/impl/cuda_cmake_macros.h").exists() for d in torch_inc):
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    includes = []
    for d in [*torch_inc, cuda_inc, python_inc]:
        includes += ["-isystem", str(d)]
    return [cxx, *flags, *includes, "-I", str(CSRC), BINDINGS.name], ""


@functools.cache
def compile_all(out_dir: str) -> dict:
    """Every compile of this file at once: {key: CompletedProcess or skip reason}."""
    jobs = {
        (name, arch): _nvcc_cmd(name, arch, Path(out_dir)) for name in CU_FILES for arch in ARCHS
    }
    cmd, why = bindings_cmd()
    results: dict = {}
    if cmd is None:
        results["bindings"] = why
    else:
        jobs["bindings"] = cmd
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = {key: pool.submit(_run, c) for key, c in jobs.items()}
        results.update({key: f.result() for key, f in futures.items()})
    return results


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return compile_all(str(tmp_path_factory.mktemp("csrc-objects")))


def test_csrc_has_the_kernels():
    assert {"kv_copy.cu", "packed_mask.cu"} <= set(CU_FILES)
    for name in CU_FILES:
        assert "#include <torch" not in (CSRC / name).read_text(), f"{name} must not need torch"


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", CU_FILES)
def test_cu_compiles_with_bare_nvcc(compiled, name, arch):
    result = compiled[(name, arch)]
    assert result.returncode == 0, f"nvcc {name} sm_{arch} failed:\n{result.stderr}"


@needs_nvcc
def test_bindings_compile_against_torch_headers(compiled):
    result = compiled["bindings"]
    if isinstance(result, str):
        pytest.skip(f"torch_bindings.cpp not checked: {result}")
    assert result.returncode == 0, f"torch_bindings.cpp failed:\n{result.stderr}"


def _schemas() -> dict[str, str]:
    text = BINDINGS.read_text()
    defs = re.findall(r"m\.def\(\s*((?:\"[^\"]*\"\s*)+)\)", text)
    schemas = ["".join(re.findall(r"\"([^\"]*)\"", d)) for d in defs]
    return {s.split("(")[0]: s for s in schemas}


def test_bindings_schemas():
    schemas = _schemas()
    assert set(schemas) == {"copy_kv_slots", "pack_masks"}
    copy = torch._C.parse_schema(schemas["copy_kv_slots"])
    caches, src, dst = copy.arguments
    assert str(caches.type) == "List[Tensor]" and caches.alias_info.is_write
    assert not (src.alias_info or dst.alias_info) and not copy.returns
    pack = torch._C.parse_schema(schemas["pack_masks"])
    assert [a.name for a in pack.arguments] == [
        "starts",
        "q_lens",
        "byte_indptr",
        "rect_indptr",
        "rects",
        "total_bytes",
    ]
    assert str(pack.arguments[-1].type) == "int" and len(pack.returns) == 1


def test_bindings_schemas_take_the_wrappers_arguments():
    """The schemas, registered under another namespace with the torch
    versions as CPU kernels, called as kv_copy.py and packed_mask.py call
    the real ops."""
    import numpy as np
    from kernel_cases import layered_caches, random_copies, reference_copy

    from vllm_multiverse.kernels.kv_copy import copy_token_slots_torch, slot_tensors
    from vllm_multiverse.kernels.packed_mask import (
        MaskedRow,
        byte_indptr,
        pack_masks_torch,
        rect_tensors,
    )

    ns = "vllm_multiverse_schema_check"
    lib = torch.library.Library(ns, "DEF")
    try:
        for schema in _schemas().values():
            lib.define(schema)
        lib.impl("copy_kv_slots", copy_token_slots_torch, "CPU")
        rows_of = {}

        def pack(starts, q_lens, byte_indptr_, rect_indptr, rects, total):
            assert isinstance(total, int)
            return pack_masks_torch(rows_of["rows"])[0]

        lib.impl("pack_masks", pack, "CPU")
        ops = getattr(torch.ops, ns)

        _, caches = layered_caches("BLNHC", 2, 4, 2, 16, 8, torch.float16)
        copies = random_copies(np.random.default_rng(0), 64, 10)
        want = reference_copy(caches, copies, 16)
        ops.copy_kv_slots(caches, *slot_tensors(copies, torch.device("cpu")))
        assert all(torch.equal(kv, w) for kv, w in zip(caches, want))

        rows = [MaskedRow(3, 4, ((4, 6, 0, 2),)), MaskedRow(0, 2, ())]
        rows_of["rows"] = rows
        t = rect_tensors(rows, "cpu")
        total = byte_indptr(rows)[-1]
        out = ops.pack_masks(
            t["starts"], t["q_lens"], t["byte_indptr"], t["rect_indptr"], t["rects"], total
        )
        assert torch.equal(out, pack_masks_torch(rows)[0])
    finally:
        lib._destroy()
