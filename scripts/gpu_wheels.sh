#!/usr/bin/env bash
# Download, on a machine with network, the wheels scripts/gpu_check.sh installs
# on a GPU machine that has none (carry .whl/ there): FlashInfer as vLLM 0.32
# pins it, its compiled dependency, nvidia-ml-py (`import flashinfer` imports
# pynvml) and ninja (FlashInfer's JIT builds with it), for that machine's
# Python (3.12 by default). About 37 MB, one version of each; with the
# working tree (about 6 MB) well under the 64 MiB a device call carries.
set -euo pipefail
cd "$(dirname "$0")/.." || exit
PY=${GPU_PYTHON_VERSION:-3.12}
rm -rf .whl
"${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: \
    --python-version "$PY" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl \
    flashinfer-python==0.7.0.post1 "apache-tvm-ffi>=0.1.11,<0.2" nvidia-ml-py ninja
ls -l .whl
wheels=(.whl/*.whl)
total=$(du -cb "${wheels[@]}" | tail -1 | cut -f1)
echo "total: $((total / 1000000)) MB in ${#wheels[@]} wheels"
if (( total > 60000000 )); then
    echo "over 60 MB: a device call carries at most 64 MiB with the working tree" >&2
    exit 1
fi
