#!/usr/bin/env bash
# A small llama-cpp-python source archive for building the CUDA variant on a machine without a package index:
# the pinned sdist without llama.cpp's test models, docs, examples and the backends tova_cpp's GPU builds do not
# use (about 7 MB instead of 76 MB). Needs pip and network access where it runs.
# usage: scripts/slim_llama_sdist.sh OUT_DIR [VERSION]        (default 0.3.36)
set -euo pipefail
out=${1:?usage: slim_llama_sdist.sh OUT_DIR [VERSION]}
ver=${2:-0.3.36}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"${PYTHON:-python3}" -m pip download -q --no-deps --no-build-isolation --no-binary llama-cpp-python \
    -d "$work" "llama-cpp-python==$ver"
tar xzf "$work/llama_cpp_python-$ver.tar.gz" -C "$work"
top="$work/llama_cpp_python-$ver"
vendor="$top/vendor/llama.cpp"
rm -rf "$top/.git" "$vendor"/{models,docs,.github,media,examples,tests,gguf-py,conversion,tools/ui} "$vendor"/tools/server/public*
for backend in sycl vulkan opencl hexagon et cann musa kompute openvino webgpu zdnn rpc blas zendnn virtgpu; do
    rm -rf "$vendor/ggml/src/ggml-$backend"
done
mkdir -p "$out"
tar czf "$out/llama_cpp_python-$ver-slim.tar.gz" -C "$work" "llama_cpp_python-$ver"
ls -la "$out/llama_cpp_python-$ver-slim.tar.gz"
