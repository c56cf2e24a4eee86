#!/usr/bin/env bash
# Download, on a machine with network, the wheels scripts/gpu_check.sh installs
# on a GPU machine that has none: FlashInfer as vLLM 0.32 pins it and its one
# compiled dependency, for that machine's Python (3.12 by default). About 37 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${GPU_PYTHON_VERSION:-3.12}
PIP="${PYTHON:-python3} -m pip download --no-deps --only-binary=:all: --implementation cp --python-version $PY -d .whl"
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
$PIP $PLATFORMS flashinfer-python==0.7.0.post1 "apache-tvm-ffi>=0.1.11,<0.2"
ls -l .whl
