"""Private: loads the C++ engine (csrc/tova.h) with cffi, after llama_cpp, and checks both share one libllama."""

from __future__ import annotations

import importlib.metadata
import os
import sys
from pathlib import Path

import cffi

from .errors import TovaVersionError

REQUIRED_LLAMA_CPP_PYTHON = "0.3.36"

CDEF = """
typedef struct tova_engine tova_engine;
tova_engine * tova_engine_create(int32_t policy, int32_t n_layer, int32_t budget, int32_t n_cells, bool v_trans,
                                 char * err, size_t err_len);
void tova_engine_free(tova_engine * e);
int32_t tova_engine_set_cells(tova_engine * e, int32_t n_cells);
int32_t tova_engine_set_keep(tova_engine * e, int32_t keep);
int32_t tova_engine_set_n_sink(tova_engine * e, int32_t n_sink);
bool tova_eval_callback(void * t, bool ask, void * user_data);
int32_t tova_engine_begin(tova_engine * e, int32_t n_tokens, int32_t pos0, bool capture_scores);
int32_t tova_engine_end(tova_engine * e);
int32_t tova_engine_cut(tova_engine * e, void * ctx);
void tova_engine_reset(tova_engine * e);
int32_t tova_engine_n_occupied(const tova_engine * e);
int32_t tova_engine_n_observed(const tova_engine * e);
int32_t tova_engine_cell_positions(const tova_engine * e, int32_t * out, size_t n);
void tova_engine_set_force_graph_mover(tova_engine * e, bool force);
const char * tova_engine_last_error(const tova_engine * e);
int32_t tova_engine_set_evict_interval(tova_engine * e, int32_t m);
void tova_engine_set_threads(tova_engine * e, int32_t n_threads);
const char * tova_engine_cache_buffer(const tova_engine * e);
int32_t tova_engine_stats(tova_engine * e, double * out, size_t n, bool reset);
int32_t tova_policy_evict(const float * score, const int32_t * pos, int32_t n, int32_t k, int32_t * out_evict);
int32_t tova_policy_choose(int32_t policy, const double * score, const int32_t * pos, int32_t n, int32_t k,
                           int32_t keep, int32_t n_sink, int32_t * out_evict);
const char * tova_libllama_path(void);
"""


ENGINE = "libtova_engine.so"


def _engine_path() -> Path:
    """Where the built engine is. A wheel install keeps it beside this file. An editable install
    (scripts/setup.sh) maps the package to the source tree and keeps the engine in site-packages: the package's
    __path__ lists both. A source checkout that shadows an installed tova_cpp (python run from the repo root)
    falls back to the installed distribution's copy."""
    override = os.environ.get("TOVA_ENGINE")  # env: TOVA_ENGINE=path/to/libtova_engine.so (sanitizer builds)
    if override:
        if not Path(override).is_file():
            raise ImportError(f"TOVA_ENGINE={override} is not a file")
        return Path(override)
    dirs = [Path(d) for d in getattr(sys.modules[__package__], "__path__", [])] + [Path(__file__).parent]
    for d in dirs:
        if (d / ENGINE).is_file():
            return d / ENGINE
    try:
        installed = Path(str(importlib.metadata.distribution("tova_cpp").locate_file(f"tova_cpp/{ENGINE}")))
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed is not None and installed.is_file():
        return installed
    raise ImportError(
        f"tova_cpp's engine ({ENGINE}) is not built: run `bash scripts/setup.sh` from the repository root "
        "(or `pip install .`)"
    )


def _load():
    import llama_cpp  # must come first: the engine binds to the libllama it has loaded

    version = getattr(llama_cpp, "__version__", "unknown")
    if version != REQUIRED_LLAMA_CPP_PYTHON:
        raise TovaVersionError(
            f"tova_cpp needs llama-cpp-python=={REQUIRED_LLAMA_CPP_PYTHON} (found {version}): the engine relies "
            f"on its graph tensor names; run: pip install llama-cpp-python=={REQUIRED_LLAMA_CPP_PYTHON}"
        )
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    lib = ffi.dlopen(str(_engine_path()))
    ours = os.path.realpath(ffi.string(lib.tova_libllama_path()).decode())
    theirs = os.path.realpath(Path(llama_cpp.__file__).parent / "lib" / "libllama.so")
    if os.path.dirname(ours) != os.path.dirname(theirs):
        raise TovaVersionError(
            f"the tova_cpp engine loaded {ours} but llama_cpp uses {theirs}; reinstall tova_cpp against "
            f"llama-cpp-python=={REQUIRED_LLAMA_CPP_PYTHON} (bash scripts/setup.sh, or pip install --force-reinstall .)"
        )
    return ffi, lib


ffi, lib = _load()
