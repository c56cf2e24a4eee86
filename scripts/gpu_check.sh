#!/usr/bin/env bash
# The CUDA checks, in one run on a GPU machine with CUDA, nvcc and a CUDA
# PyTorch but no vLLM and no network (the H200 machines here: CUDA 13,
# PyTorch 2.11). Under 10 minutes; most of it is FlashInfer compiling its
# prefill kernels at first use.
#
#   bash scripts/gpu_wheels.sh     # once, where there is network: .whl/
#   bash scripts/gpu_check.sh      # on the GPU machine, from the repo root
#
# 1. builds csrc/ (vllm_multiverse._C) against that torch;
# 2. runs the tests marked `cuda`: the merge's KV-copy kernel against the
#    torch fallback on bf16/fp16/fp32 caches in vLLM's layouts and kernel
#    block sizes, the packed-mask kernel against its torch version, and
#    FlashInfer's masked paged prefill against float64 attention with the
#    structure rule's dense mask (tests/test_kernels_cuda.py,
#    tests/test_flashinfer_masked.py);
# 3. times the copy kernel against a plain device-to-device copy of the same
#    bytes, and the masked prefill against the same prefill with no mask
#    (benchmarks/gpu_kernels.py, benchmarks/gpu_masked_prefill.py).
# Output goes to stdout and, when set, to $OUT/gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${OUT:-/tmp}/gpu_check.log
exec > >(tee "$LOG") 2>&1
PY=${PYTHON:-python3}
status=0
step() { echo; echo "=== $* ($(date +%T))"; }

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
nvcc --version | tail -1
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

step "wheels"
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || status=1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
    echo "no .whl/ (scripts/gpu_wheels.sh): the FlashInfer checks will be skipped"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# FlashInfer compiles its kernels with nvcc at first use; Hopper only.
export FLASHINFER_CUDA_ARCH_LIST=${FLASHINFER_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
$PY -c "import flashinfer; print('flashinfer', flashinfer.__version__)" || true

step "build csrc/"
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MULTIVERSE_BUILD_CUDA=1 \
    $PY setup.py -q build_ext --inplace || status=1
$PY -c "import vllm_multiverse._C, torch; print('ops:', [o for o in dir(torch.ops.vllm_multiverse) if not o.startswith('_')])" || status=1

step "tests marked cuda"
timeout 420 $PY -m pytest -q -p no:cacheprovider -o addopts="" -m cuda -rs \
    tests/test_kernels_cuda.py tests/test_flashinfer_masked.py || status=1

step "benchmarks"
timeout 120 $PY benchmarks/gpu_kernels.py || status=1
timeout 120 $PY benchmarks/gpu_masked_prefill.py || status=1

step "done: exit $status"
exit $status
