#!/usr/bin/env bash
# Builds llama-cpp-python==0.3.36 with CUDA (sm_90, H100/H200) and tova_cpp against it into a --target folder,
# then runs the GPU tests. For a machine without a package index: pass the slim sdist
# (scripts/slim_llama_sdist.sh) and wheels of what the machine lacks (cffi, pycparser, diskcache, gguf).
# usage: cuda_build_and_test.sh SDIST WHEEL_DIR SITE [pytest args...]
#   e.g. cuda_build_and_test.sh llama_cpp_python-0.3.36-slim.tar.gz whl /tmp/site tests/test_gpu.py
set -euo pipefail
sdist=$(realpath "$1"); wheels=$(realpath "$2"); site=$3; shift 3
src=$(cd "$(dirname "$0")/.." && pwd)
python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
# libggml-cuda.so exports libstdc++ symbols of its own; loaded first (RTLD_GLOBAL) they take over libllama's
# iostream calls and crash model loading: put the system libstdc++ first
export LD_PRELOAD="$(g++ -print-file-name=libstdc++.so.6)${LD_PRELOAD:+:$LD_PRELOAD}"
if [ ! -f "$site/llama_cpp/lib/libggml-cuda.so" ]; then
    export CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=off"
    export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
    time python3 -m pip install -q --no-build-isolation --no-deps --no-compile --target "$site" "$sdist"
fi
time python3 -m pip install -q --no-build-isolation --no-deps --no-compile --target "$site" --upgrade "$src"
python3 -c "import llama_cpp, tova_cpp; print('llama-cpp-python', llama_cpp.__version__, 'gpu offload:', llama_cpp.llama_supports_gpu_offload())"
if [ $# -gt 0 ]; then
    cd /tmp && python3 -m pytest -p no:cacheprovider -q -rs "${@/#tests/$src/tests}" || true
fi
