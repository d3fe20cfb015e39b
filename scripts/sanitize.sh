#!/usr/bin/env bash
# The engine under AddressSanitizer + UndefinedBehaviorSanitizer: builds csrc/ with -DTOVA_SANITIZE=ON into
# build/sanitize (the installed engine is untouched), then runs the engine and oracle tests with that build
# (TOVA_ENGINE) and libasan preloaded. Python and libllama are not instrumented; leaks are not checked (the
# interpreter keeps its objects until exit by design). Any report stops the run with a non-zero status.
# usage: bash scripts/sanitize.sh [extra pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
BUILD=build/sanitize
site=$("$PY" -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llama_cpp').origin).parent.parent)")
cmake_bin=$("$PY" -c "import cmake, os; print(os.path.join(cmake.CMAKE_BIN_DIR, 'cmake'))" 2>/dev/null || command -v cmake)
"$cmake_bin" -S . -B "$BUILD" -DTOVA_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo -DLLAMA_CPP_DIR="$site" \
  -DPython_EXECUTABLE="$PY" >/dev/null
"$cmake_bin" --build "$BUILD" -j 2 >/dev/null
engine=$(realpath "$BUILD/libtova_engine.so")
asan=$(${CXX:-c++} -print-file-name=libasan.so)
[ -f "$asan" ] || { echo "libasan not found (${CXX:-c++} -print-file-name=libasan.so)" >&2; exit 1; }
echo "engine: $engine (ASan + UBSan), preloading $asan"

export TOVA_ENGINE="$engine" LD_PRELOAD="$asan"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:verify_asan_link_order=0"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
# engine and oracle tests; of test_session.py the tiny-model tests (no download needed)
"$PY" -m pytest -q -p no:cacheprovider tests/test_policy.py tests/test_reference.py tests/test_fuzz.py \
  "tests/test_session.py::test_budget_above_sequence_equals_plain_llama_cpp[tiny]" \
  tests/test_session.py::test_policy_arguments_are_value_errors \
  tests/test_session.py::test_every_policy_runs_bounded_with_the_largest_keep \
  tests/test_session.py::test_only_scoring_policies_capture \
  tests/test_session.py::test_keep_is_set_before_the_first_decode_only "$@"
