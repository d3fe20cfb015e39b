"""Private: loads the C++ engine (csrc/tova.h) with cffi, after llama_cpp, and checks both share one libllama."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import sys
from pathlib import Path

import cffi

from .errors import TovaVersionError

REQUIRED_LLAMA_CPP_PYTHON = "0.3.36"

HEADER = "tova.h"


def cdef_from_header(text: str) -> str:
    """The C API as cffi reads it: tova.h without preprocessor lines and the C++-only `extern "C"` block."""
    out, cplusplus = [], False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#ifdef __cplusplus"):
            cplusplus = True
        if not stripped.startswith("#") and not cplusplus:
            out.append(line)
        if cplusplus and stripped.startswith("#endif"):
            cplusplus = False
    return "\n".join(out)


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


def _header_path(engine: Path) -> Path:
    """The tova.h to declare: the source tree's (an editable install or a checkout) when there is one, so an
    engine not rebuilt after a header change is caught; else the copy installed beside the engine."""
    source = Path(__file__).resolve().parent.parent / "csrc" / HEADER
    return source if source.is_file() else engine.parent / HEADER


def _load():
    import llama_cpp  # must come first: the engine binds to the libllama it has loaded

    version = getattr(llama_cpp, "__version__", "unknown")
    if version != REQUIRED_LLAMA_CPP_PYTHON:
        raise TovaVersionError(
            f"tova_cpp needs llama-cpp-python=={REQUIRED_LLAMA_CPP_PYTHON} (found {version}): the engine relies "
            f"on its graph tensor names; run: pip install llama-cpp-python=={REQUIRED_LLAMA_CPP_PYTHON}"
        )
    engine = _engine_path()
    header = _header_path(engine)
    if not header.is_file():
        raise ImportError(f"tova_cpp's C header ({header}) is missing: reinstall tova_cpp")
    text = header.read_bytes()
    ffi = cffi.FFI()
    ffi.cdef(cdef_from_header(text.decode()))
    lib = ffi.dlopen(str(engine))
    try:
        built_from = ffi.string(lib.tova_abi_hash()).decode()
    except AttributeError:  # an engine from before the ABI check
        built_from = "none"
    if built_from != hashlib.sha256(text).hexdigest():
        raise TovaVersionError(
            f"the tova_cpp engine ({engine}) was built from another {HEADER} than {header}: rebuild it "
            "(bash scripts/setup.sh, or pip install --no-deps --no-build-isolation -e .)"
        )
    ours = os.path.realpath(ffi.string(lib.tova_libllama_path()).decode())
    theirs = os.path.realpath(Path(llama_cpp.__file__).parent / "lib" / "libllama.so")
    if os.path.dirname(ours) != os.path.dirname(theirs):
        raise TovaVersionError(
            f"the tova_cpp engine loaded {ours} but llama_cpp uses {theirs}; reinstall tova_cpp against "
            f"llama-cpp-python=={REQUIRED_LLAMA_CPP_PYTHON} (bash scripts/setup.sh, or pip install --force-reinstall .)"
        )
    return ffi, lib


ffi, lib = _load()
