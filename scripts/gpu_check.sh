#!/usr/bin/env bash
# The GPU checks in one run, for a machine lent for a few minutes: one H100 or
# H200, CUDA 13 with nvcc, python3 3.12 with a CUDA PyTorch, Triton and ninja,
# no vLLM and no network. Under 8 minutes on one H100; the largest part is
# FlashInfer compiling its FA2 prefill module (sm_90 only).
#
#   bash scripts/gpu_wheels.sh     # where there is network: .whl/ (git-ignored)
#   bash scripts/gpu_check.sh      # on the GPU machine, from the repo root, with .whl/ carried
#
# Steps, each under a timeout and all under one deadline ($GPU_CHECK_BUDGET_S,
# 455 s); a failing step does not stop the next:
#  1. the machine: GPU, driver, nvcc, torch;
#  2. the wheels of .whl/ into /tmp/site; fails where .whl/ is missing or
#     `import flashinfer` fails;
#  3. csrc/ (vllm_multiverse._C) built for sm_90;
#  4. FlashInfer's FA2 masked-prefill module built from an empty JIT cache by
#     warm_up_flashinfer at Multiverse-32B shapes (what the plugin pays at
#     engine start-up), then loaded from that cache by a new process;
#  5. tests/test_kernels_cuda.py and tests/test_flashinfer_masked.py: fails
#     if any test fails or is skipped;
#  6. peak memory of the SDPA route and of the packed mask on long rows
#     (benchmarks/gpu_memory.py);
#  7. timings: the copy and mask kernels (benchmarks/gpu_kernels.py), the
#     masked prefill and one whole step (benchmarks/gpu_masked_prefill.py).
# Ends with one table (benchmarks/gpu_summary.py), also written to
# $OUT/gpu_check.md; the whole log goes to $OUT/gpu_check.log (or a temporary
# folder). Exits 0 only when every step passed: a step that was skipped or
# not reached fails.
set -uo pipefail
cd "$(dirname "$0")/.." || exit
export PY=${PYTHON:-python3}
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
export WORK
exec > >(tee "${OUT:-$WORK}/gpu_check.log") 2>&1
export GPU_CHECK_RECORDS=$WORK/records.jsonl PYTHONUNBUFFERED=1
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET_S:-455}))

export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PATH=$PATH:/tmp/site/bin  # ninja from .whl/ where the machine has none
# FlashInfer's JIT cache in a fresh folder (flashinfer/jit/env.py:
# $FLASHINFER_WORKSPACE_BASE/.cache/flashinfer), so step 4 times a cold build.
export FLASHINFER_WORKSPACE_BASE=$WORK/flashinfer
export FLASHINFER_CUDA_ARCH_LIST=9.0 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16

# run_step NAME CAP COMMAND...: COMMAND (a program or a function below) under
# a timeout of CAP seconds, or what is left before the deadline; its result,
# its time and the note it left in $WORK/note go to the records.
run_step() {
    local name=$1 cap=$2
    shift 2
    local left=$((DEADLINE - SECONDS))
    if ((left < 15)); then
        echo "=== $name: not run, out of time"
        "$PY" benchmarks/gpu_summary.py step "$name" 125 0
        return
    fi
    ((cap > left)) && cap=$left
    echo
    echo "=== $name ($(date +%T), at most ${cap} s)"
    rm -f "$WORK/note"
    local t0=$EPOCHREALTIME rc
    GPU_CHECK_STEP=$name timeout -k 10 "$cap" bash -o pipefail -c '"$@"' _ "$@"
    rc=$?
    ((rc == 137)) && rc=124
    "$PY" benchmarks/gpu_summary.py step "$name" "$rc" "$(awk "BEGIN { print $EPOCHREALTIME - $t0 }")" \
        "$(cat "$WORK/note" 2>/dev/null)"
}

machine() {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || return
    nvcc --version | tail -1 || return
    "$PY" -c "import sys, torch; assert torch.cuda.is_available(), 'torch sees no GPU'
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" |
        tee "$WORK/note"
}

wheels() {
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "no .whl/: run scripts/gpu_wheels.sh where there is network, and carry .whl" | tee "$WORK/note"
        return 1
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ||
        return
    "$PY" -c "import flashinfer, pynvml, tvm_ffi; print('flashinfer', flashinfer.__version__, 'from', flashinfer.__file__)" |
        tee "$WORK/note"
}

build_csrc() {
    MULTIVERSE_BUILD_CUDA=1 "$PY" setup.py -q build_ext --inplace || return
    "$PY" -c "import vllm_multiverse._C, torch
print('ops:', [o for o in dir(torch.ops.vllm_multiverse) if not o.startswith('_')])" | tee "$WORK/note"
}

# pytest has no "fail on skip": its summary line is read instead.
gpu_tests() {
    "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -rs "$@" | tee "$WORK/pytest.out"
    local rc=${PIPESTATUS[0]}
    tail -1 "$WORK/pytest.out" | tr -d '=' | sed 's/^ *//' >"$WORK/note"
    if grep -Eq '[0-9]+ (skipped|deselected|xfailed|xpassed)' "$WORK/note"; then
        echo "FAIL: a test did not run on the GPU machine"
        return 1
    fi
    return "$rc"
}
export -f machine wheels build_csrc gpu_tests

run_step "machine" 60 machine
run_step "wheels: install .whl/, import flashinfer" 120 wheels
run_step "build csrc/ (sm_90)" 240 build_csrc
run_step "FlashInfer FA2 module: cold build (warm_up_flashinfer)" 330 "$PY" benchmarks/gpu_flashinfer_build.py --cold
run_step "FlashInfer FA2 module: load from the JIT cache" 60 "$PY" benchmarks/gpu_flashinfer_build.py
run_step "tests: test_kernels_cuda.py, test_flashinfer_masked.py" 240 gpu_tests \
    tests/test_kernels_cuda.py tests/test_flashinfer_masked.py
run_step "peak memory: SDPA route, old call, packed mask" 120 "$PY" benchmarks/gpu_memory.py
run_step "timings: copy and mask kernels" 60 "$PY" benchmarks/gpu_kernels.py
run_step "timings: masked prefill, one whole step" 120 "$PY" benchmarks/gpu_masked_prefill.py

echo
echo "=== summary ($((SECONDS)) s)"
"$PY" benchmarks/gpu_summary.py table
