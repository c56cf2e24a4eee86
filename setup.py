# All metadata is in pyproject.toml; this file only adds the optional CUDA
# extension vllm_multiverse._C (csrc/, see csrc/README.md).
#
# The extension is built only where torch imports, is a CUDA build
# (torch.version.cuda) and nvcc is found, unless MULTIVERSE_BUILD_CUDA=0.
# pyproject's build-system requires only setuptools and wheel, so pip's
# isolated build never sees torch: build it with a CUDA torch installed and
#   pip install --no-build-isolation -e .
# Everywhere else (CPU machines, isolated builds) this is a plain setup():
# the package then uses the pure-torch ops of vllm_multiverse/kernels.
#
# Arch flags: TORCH_CUDA_ARCH_LIST when set (torch's own handling), else
# sm_80 and sm_90 code plus compute_90 PTX for newer GPUs.
import os
import shutil
import sys

from setuptools import setup

SOURCES = ["csrc/kv_copy.cu", "csrc/packed_mask.cu", "csrc/torch_bindings.cpp"]
DEFAULT_GENCODE = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
]


def _cuda_home():
    """The CUDA toolkit: $CUDA_HOME / $CUDA_PATH, else the one whose nvcc is
    on PATH, else /usr/local/cuda; one with nvcc and its headers."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and os.path.exists(
            os.path.join(home, "include", "cuda_runtime_api.h")
        ):
            return home
    return None


def _cuda_build():
    """(setup kwargs for the extension, None) or ({}, why not)."""
    if os.environ.get("MULTIVERSE_BUILD_CUDA", "1") == "0":
        return {}, "MULTIVERSE_BUILD_CUDA=0"
    try:
        import torch
    except ImportError:
        return {}, "torch is not importable"
    if torch.version.cuda is None:
        return {}, f"torch {torch.__version__} is not a CUDA build"
    home = _cuda_home()
    if home is None:
        return {}, "nvcc not found (set CUDA_HOME to the CUDA toolkit)"
    # Before torch.utils.cpp_extension reads it: torch's own guess from an
    # nvcc wrapper script on PATH (e.g. /usr/local/bin/nvcc) is that folder's
    # parent, without the toolkit's headers.
    os.environ.setdefault("CUDA_HOME", home)
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    nvcc_flags = ["-O3"]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        nvcc_flags += DEFAULT_GENCODE
    ext = CUDAExtension(
        name="vllm_multiverse._C",
        sources=SOURCES,
        include_dirs=[os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}, None


kwargs, why_not = _cuda_build()
if why_not:
    print(f"vllm_multiverse: not building the CUDA ops ({why_not})", file=sys.stderr)
setup(**kwargs)
