"""A GGUF model + a llama.cpp context + the TOVA engine: evaluate tokens into a per-layer bounded KV cache.

Semantics (the paper's; docs/ARCHITECTURE.md section 1): every `eval` call is split into pieces that fit in memory
(budget + chunk cells); each piece gets full causal attention, then every layer is cut to `budget` by its
policy. Decoding one token per call is the paper's per-token setting. Deviation, named: a piece is as large as
free memory allows (the first piece of a long prompt fills budget + chunk cells, later ones are `chunk`
tokens), the paper has no chunked prefill.

Policies (all per layer, all with the same budget; each layer of the model keeps its own set):

- ``full``: no eviction (at most budget + chunk tokens in all).
- ``tova``: keep the `budget` keys with the highest attention of the piece's last token, averaged over all
  query heads (Oren et al. 2024).
- ``window``: keep the most recent `budget` keys.
- ``sink``: keep the first `n_sink` positions (default 4) and the most recent `budget - n_sink` keys
  (StreamingLLM, Xiao et al. 2023). Deviation, named: every key keeps its original position (RoPE is inside
  the cached K and never re-applied), as for every policy here (docs/ARCHITECTURE.md section 1); StreamingLLM assigns
  positions by place in the cache instead.
- ``h2o``: keep the most recent ceil(budget/2) keys and the budget//2 older keys with the largest attention
  accumulated since the key entered (Zhang et al. 2023). The accumulator adds, on every decode, each query's
  attention row averaged over all query heads, summed over ALL queries of the batch: a prompt piece adds the
  column sums of its whole causal attention matrix, as H2O does; a key's own query counts. Deviations from
  H2O, named: one set per layer shared by all heads (H2O keeps a set per head), with head-averaged scores;
  the recent half takes the extra cell when the budget is odd; a prompt longer than memory is cut after each
  piece.

`keep` (like llama.cpp's --keep, default 0) protects original positions < keep from every evicting policy:
they count toward the budget, and the policy chooses among the rest (for h2o the unprotected budget
u = budget - protected tokens held is halved: ceil(u/2) recent, u//2 heavy); with ``sink`` the first
max(keep, n_sink) positions are protected. keep must be < budget. Ties in a score evict the older key first.

evict_interval m > 1 (deviation from the paper, which cuts after every token): the cache holds up to
budget + m cells and is cut back to `budget` only once it is that full, by the policy (tova: by the attention
row of the token that filled it; scores are captured only for that token, so the per-layer capture cost is
paid once per m steps).

flash_attn=True (every policy but h2o, which needs every query's row and refuses it): flash attention never
forms the probabilities, so for tova the engine keeps each layer's newest query and recomputes
softmax(K q * scale + mask) per head on the cache's own device (csrc/score.cpp); the
scores use the cache's own K rows (an F32 cache is cast to F16 only inside flash attention).
Quantized caches (q8_0, q4_0) are moved as raw bytes; a quantized V cache needs flash_attn=True (llama.cpp).

Sliding-window models (gemma2, gemma3, gpt-oss; docs/SWA.md): the policy runs on the full-attention layers
(`managed_layers`) and llama.cpp keeps its window of `n_swa` tokens on the others. An evicting policy needs
budget >= n_swa - 1, so that no cut frees a position a sliding-window layer still sees. With attention sinks
(gpt-oss) tova's scores are the model's own probabilities, the sink in each head's denominator.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import sys
import threading
import warnings
from pathlib import Path

import llama_cpp
import llama_cpp._logger
import numpy as np

from ._ffi import ffi, lib
from .errors import (
    Cancelled,
    EngineError,
    ModelLoadError,
    SessionBusyError,
    SessionClosedError,
    StateError,
    TokenizerError,
    UnsupportedModelError,
)
from .threads import FreeCores

POLICIES = {"full": 0, "tova": 1, "window": 2, "sink": 3, "h2o": 4}
DEFAULT_N_SINK = 4
CACHE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 8, "bf16": 30}
# (bytes per block, elements per block) of each cache type
_TYPE_BLOCK = {"f32": (4, 1), "f16": (2, 1), "bf16": (2, 1), "q8_0": (34, 32), "q4_0": (18, 32)}
# architectures whose attention bias comes from positions (ALiBi): evicting would change what they compute
ALIBI_ARCHS = {"bloom", "mpt", "jais", "baichuan", "refact"}

_backend_ready = False


def _ensure_backend() -> None:
    global _backend_ready
    if not _backend_ready:
        llama_cpp.llama_backend_init()
        _backend_ready = True


def _check_gguf_file(path: Path) -> None:
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (magic {magic!r}, expected b'GGUF')")


def _meta(model, key: str) -> str | None:
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode(errors="replace") if n >= 0 else None


# iSWA architectures: layer il is a sliding-window layer unless il % p == p - 1 (llama.cpp's default pattern p
# for the architecture, used when the GGUF has no {arch}.attention.sliding_window_pattern). docs/SWA.md
SWA_PATTERNS = {"gemma2": 2, "gemma3": 6, "gpt-oss": 2}


# llama-cpp-python 0.3.36's log callback reads ggml's levels by an older enum (ERROR = 3): the ERROR of the ggml it
# ships (ggml.h: DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5) reaches it as DEBUG and is dropped unless verbose, so a
# failing CUDA call printed only ggml's abort line, never its error text. This callback maps ggml's own enum and
# keeps llama-cpp-python's verbose switch (its logger's level): errors always print, the rest when verbose.
_GGML_LEVELS = {0: logging.CRITICAL, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_last_log_level = [logging.CRITICAL]


@llama_cpp.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # 5 (CONT) continues the last line at its level
    lvl = _last_log_level[0] if level == 5 else _GGML_LEVELS.get(level, logging.ERROR)
    _last_log_level[0] = lvl
    if llama_cpp._logger.logger.level <= lvl:
        print(text.decode("utf-8", errors="replace"), end="", flush=True, file=sys.stderr)


def _set_verbose(verbose: bool) -> None:
    llama_cpp._logger.set_verbose(verbose)
    llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))  # process-wide, as llama-cpp-python's own


def load_model(path: Path, n_gpu_layers: int, verbose: bool, *, vocab_only: bool = False):
    """Checks the file and loads it (or only its vocabulary) into llama.cpp: the model handle, or
    ModelLoadError when it cannot."""
    _check_gguf_file(path)
    _set_verbose(verbose)
    _ensure_backend()
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = n_gpu_layers
    mparams.vocab_only = vocab_only
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
    if not model:
        if vocab_only:
            raise ModelLoadError(f"llama.cpp could not load the vocabulary of {path}")
        raise ModelLoadError(f"llama.cpp could not load {path} (truncated or unsupported GGUF?)")
    return model


class _CudaGraphs:
    """Whether this process has opened a GPU context through tova_cpp, and whether it was warned (below)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.gpu_opened = False
        self.warned = False


_CUDA_GRAPHS = _CudaGraphs()


def guard_cuda_graphs(n_gpu_layers: int, many_sequences: bool) -> None:
    """Turn llama.cpp's CUDA graphs off for this process before the first GPU context of a BatchSession.

    On an H200 (docs/BATCH.md, "CUDA abort with many sequences") BatchSessions of 16-32 sequences aborted the
    process inside llama.cpp's CUDA backend, `full` policy included (it runs none of the engine's device code);
    those whose error printed said "an illegal instruction was encountered". One run aborted at the same answer
    on six resumes of one saved state (programmatic dependent launch on or off; with CUDA_LAUNCH_BLOCKING=1 the
    failing call was cudaGraphLaunch) and ran to the end with GGML_CUDA_DISABLE_GRAPHS=1. llama.cpp reads that
    variable once per process, at its first graph compute: it is set here when a BatchSession is the first GPU
    context tova_cpp opens and the variable is not set already (any value turns the graphs off). A Session
    opened on the GPU earlier may have read it already: then the graphs stay on and a RuntimeWarning says so,
    once. Opt out with TOVA_CUDA_GRAPHS=1. Single-sequence Sessions never change it; on other GPU backends it
    has no effect."""
    if n_gpu_layers == 0 or not llama_cpp.llama_supports_gpu_offload():
        return
    with _CUDA_GRAPHS.lock:
        first = not _CUDA_GRAPHS.gpu_opened
        _CUDA_GRAPHS.gpu_opened = True
        if not many_sequences or "GGML_CUDA_DISABLE_GRAPHS" in os.environ:
            return
        if os.environ.get("TOVA_CUDA_GRAPHS") == "1":
            return
        if first:
            os.environ["GGML_CUDA_DISABLE_GRAPHS"] = "1"
        elif not _CUDA_GRAPHS.warned:
            _CUDA_GRAPHS.warned = True
            warnings.warn(
                "a GPU Session opened earlier in this process may have enabled llama.cpp's CUDA graphs, which "
                "aborted BatchSessions on CUDA (docs/BATCH.md); set GGML_CUDA_DISABLE_GRAPHS=1 before the first "
                "GPU session, or TOVA_CUDA_GRAPHS=1 to keep them and silence this",
                RuntimeWarning,
                stacklevel=3,
            )


class _SharedModels:
    """The models a `shared_models()` block keeps loaded, with the number of sessions holding each."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.depth = 0  # open shared_models() blocks
        self.by_key: dict[tuple[str, int], object] = {}  # (resolved path, n_gpu_layers) -> model
        # id of a model's handle -> sessions holding it (+1 while a block is open)
        self.refs: dict[int, int] = {}


_SHARED = _SharedModels()


def _handle_id(model) -> int:
    return ctypes.cast(model, ctypes.c_void_p).value or 0


def acquire_model(path: Path, n_gpu_layers: int, verbose: bool):
    """load_model, or, inside a `shared_models()` block, the model already loaded there for the same file and
    n_gpu_layers. Give it back with release_model."""
    with _SHARED.lock:  # held while loading inside a block, so that two threads never load one file twice
        if _SHARED.depth > 0:
            key = (str(Path(path).resolve()), n_gpu_layers)
            model = _SHARED.by_key.get(key)
            if model is None:
                model = load_model(path, n_gpu_layers, verbose)
                _SHARED.by_key[key] = model
                _SHARED.refs[_handle_id(model)] = 1  # the block's own hold
            _SHARED.refs[_handle_id(model)] += 1
            return model
    return load_model(path, n_gpu_layers, verbose)  # outside any block: its own model, no lock held


def release_model(model) -> None:
    """A session is done with `model`: freed unless a shared_models() block or another session still holds it."""
    with _SHARED.lock:
        hid = _handle_id(model)
        if hid in _SHARED.refs:
            _SHARED.refs[hid] -= 1
            if _SHARED.refs[hid] > 0:
                return
            del _SHARED.refs[hid]
    llama_cpp.llama_model_free(model)


@contextlib.contextmanager
def shared_models():
    """Within this block, Sessions and BatchSessions that open the same GGUF file with the same n_gpu_layers
    share one loaded model (llama.cpp's weights, on the GPU too) instead of loading it each time; each session
    still has its own context and cache. A model is freed when the block ends and no open session holds it (a
    session still open frees it when it closes). Blocks nest. For many short sessions on one model: the
    benchmarks run one session per (policy, budget) or per sample inside one."""
    with _SHARED.lock:
        _SHARED.depth += 1
    try:
        yield
    finally:
        ending = []
        with _SHARED.lock:
            _SHARED.depth -= 1
            if _SHARED.depth == 0:  # the outermost block: give back its hold on every model
                ending = list(_SHARED.by_key.values())
                _SHARED.by_key.clear()
        for model in ending:
            release_model(model)


def swa_min_budget(n_swa: int) -> int:
    """The smallest budget an evicting policy may use on a model with a window of n_swa (docs/SWA.md): the cell
    trick frees the smallest metadata position in every layer, the sliding-window layers' too, and after a cut
    at newest position P the next query (P + 1) must still find positions P + 2 - n_swa .. P."""
    return n_swa - 1


def swa_layers(model, path: Path) -> list[bool] | str:
    """Per layer: True where llama.cpp runs a sliding window (its iSWA cache keeps those layers bounded), or
    why the pattern cannot be known. All False for a model without sliding-window attention."""
    n_layer = llama_cpp.llama_model_n_layer(model)
    if llama_cpp.llama_model_n_swa(model) <= 0:
        return [False] * n_layer
    arch = _meta(model, "general.architecture") or "unknown"
    if arch not in SWA_PATTERNS:
        return (
            f"model uses sliding-window attention ({arch}); tova_cpp manages the full-attention layers of "
            f"{sorted(SWA_PATTERNS)} only, whose layer pattern it knows"
        )
    key = f"{arch}.attention.sliding_window_pattern"
    flags = ffi.new("uint8_t[]", n_layer + 1)
    n = lib.tova_gguf_bool_array(str(path).encode(), key.encode(), flags, n_layer + 1)
    if n == n_layer:  # llama.cpp reads an array as one flag per layer, true = sliding
        return [bool(f) for f in flags[0:n_layer]]
    if n != 0:
        return f"{key} holds {n} flags for {n_layer} layers (or the file cannot be read)"
    pattern = _meta(model, key)
    p = int(pattern) if pattern is not None else SWA_PATTERNS[arch]
    return [p == 0 or il % p < p - 1 for il in range(n_layer)]


def _refusal(model, path: Path) -> str | None:
    """Why this model's cache cannot be managed per layer, or None."""
    arch = _meta(model, "general.architecture") or "unknown"
    if llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model):
        return f"model has a recurrent or hybrid memory ({arch}); TOVA applies to attention KV caches only"
    swa = swa_layers(model, path)
    if isinstance(swa, str):
        return swa
    if all(swa):
        return (
            f"every layer of this model uses sliding-window attention ({arch}): llama.cpp already bounds its "
            "cache, there is no full-attention layer for tova_cpp to manage"
        )
    alibi = _meta(model, f"{arch}.attention.max_alibi_bias")
    if arch in ALIBI_ARCHS or (alibi is not None and float(alibi) > 0):
        return f"model uses ALiBi ({arch}): its bias comes from cache positions, which eviction would change"
    if _meta(model, f"{arch}.attention.kv_lora_rank") is not None:
        return f"model uses multi-head latent attention ({arch}); its compressed cache is not supported"
    return None


def _cache_type(name: str) -> int:
    try:
        return CACHE_TYPES[name]
    except KeyError:
        raise ValueError(f"unknown KV cache type {name!r}; choose one of {sorted(CACHE_TYPES)}") from None


GGML_MAX_N_THREADS = 512  # ggml.h
_MAX_CELLS = 2**31 - 1 - 256  # the engine and llama.cpp count cells and positions in int32; n_ctx pads to 256


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _token_ids(tokens, n_vocab: int) -> np.ndarray:
    """Token ids as int64, refusing floats, strings, bools and ids outside [0, n_vocab) (llama.cpp aborts on
    those)."""
    toks = np.asarray(tokens)
    if toks.size and toks.dtype.kind not in "iu":
        raise ValueError(f"token ids must be integers, got {toks.dtype} ({toks.reshape(-1)[0]!r}, ...)")
    toks = toks.astype(np.int64).reshape(-1)
    if toks.size and (toks.min() < 0 or toks.max() >= n_vocab):
        raise ValueError(f"token ids must be in [0, {n_vocab}), got {toks.min()}..{toks.max()}")
    return toks


def _exclusive(method=None, *, require_open: bool = True):
    """Runs the method only if no other thread is inside the session (non-blocking: a second thread gets
    SessionBusyError instead of corrupting the cache or waiting on a decode), and only on an open session unless
    require_open=False. The lock is reentrant: a method may call another on the same thread."""
    if method is None:
        return functools.partial(_exclusive, require_open=require_open)

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if not self._lock.acquire(blocking=False):
            raise SessionBusyError(
                f"this Session is in use by another thread ({method.__name__} refused); use one Session per "
                "thread, or serialize the calls"
            )
        try:
            if require_open:
                self._require_open()
            return method(self, *args, **kwargs)
        finally:
            self._lock.release()

    return wrapper


def default_threads() -> int:
    # llama.cpp's default of 4 threads on a 2-core machine decoded 3x slower (docs/ARCHITECTURE.md section 6)
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


# tova_engine_stats' counters, named after tova.h's TOVA_STAT_* in their order (TOVA_STAT_MOVE_S -> "move_s")
ENGINE_STATS = tuple(
    n.removeprefix("TOVA_STAT_").lower()
    for n in sorted(
        (n for n in dir(lib) if n.startswith("TOVA_STAT_") and n != "TOVA_STAT_COUNT"),
        key=lambda n: getattr(lib, n),
    )
)


class Session:
    """One model, one context, one bounded KV cache (a single sequence).

    Sizes are checked before anything is allocated (ValueError saying what fits): the context holds
    memory = budget + max(chunk, evict_interval) cells (< 2**31); on the CPU (n_gpu_layers=0) those cells'
    KV rows, the engine's bookkeeping and one ubatch's attention matrix must fit in the machine's physical
    memory; n_ubatch is clamped to `memory` (no piece is larger); n_threads is 1..512 (ggml's limit).
    n_threads=None: every core this process may use, minus those other processes keep busy, re-measured
    between evals at most every 0.25 s (tova_cpp/threads.py); a given n_threads is kept as it is.
    A session serves one thread at a time (another thread gets SessionBusyError); after close() every method
    raises SessionClosedError. An exception inside `eval` (KeyboardInterrupt included) resets the cache.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        budget: int,
        policy: str = "tova",
        keep: int = 0,
        n_sink: int | None = None,
        chunk: int = 256,
        evict_interval: int = 1,
        n_ubatch: int | None = None,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        flash_attn: bool = False,
        type_k: str = "f16",
        type_v: str = "f16",
        verbose: bool = False,
    ) -> None:
        self._lock = threading.RLock()
        self._ctx = self._model = self._engine = None
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"budget must be an integer >= 1, got {budget!r}")
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose one of {sorted(POLICIES)}")
        if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep < budget:
            raise ValueError(
                f"keep must be an integer in [0, budget={budget}) (the protected prefix must leave room to "
                f"evict), got {keep!r}"
            )
        if n_sink is not None and policy != "sink":
            raise ValueError(f"n_sink applies to policy 'sink' only (policy is {policy!r})")
        if n_sink is None:
            n_sink = DEFAULT_N_SINK if policy == "sink" else 0
        if isinstance(n_sink, bool) or not isinstance(n_sink, int) or not 0 <= n_sink < budget:
            raise ValueError(f"n_sink must be an integer in [0, budget={budget}), got {n_sink!r}")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk must be an integer >= 1, got {chunk!r}")
        n_ubatch = chunk if n_ubatch is None else n_ubatch
        if isinstance(n_ubatch, bool) or not isinstance(n_ubatch, int) or n_ubatch < 1:
            raise ValueError(f"n_ubatch must be an integer >= 1, got {n_ubatch!r}")
        if n_threads is not None and (
            isinstance(n_threads, bool)
            or not isinstance(n_threads, int)
            or not 1 <= n_threads <= GGML_MAX_N_THREADS
        ):
            raise ValueError(f"n_threads must be an integer in [1, {GGML_MAX_N_THREADS}], got {n_threads!r}")
        if chunk > n_ubatch:
            raise ValueError(f"chunk ({chunk}) must not exceed n_ubatch ({n_ubatch}): a chunk is one ubatch")
        if isinstance(evict_interval, bool) or not isinstance(evict_interval, int) or evict_interval < 1:
            raise ValueError(f"evict_interval must be an integer >= 1, got {evict_interval!r}")
        if not isinstance(flash_attn, bool):
            raise ValueError(f"flash_attn must be True or False, got {flash_attn!r}")
        if flash_attn and policy == "h2o":
            raise ValueError("policy h2o needs flash_attn=False: it accumulates every query's attention row")
        tk, tv = _cache_type(type_k), _cache_type(type_v)
        if tv not in (CACHE_TYPES["f32"], CACHE_TYPES["f16"], CACHE_TYPES["bf16"]) and not flash_attn:
            raise ValueError(f"a quantized V cache ({type_v}) needs flash attention in llama.cpp")
        path = Path(model_path)
        self.model_path = str(path)
        guard_cuda_graphs(n_gpu_layers, many_sequences=False)
        self._model = model = acquire_model(path, n_gpu_layers, verbose)
        why = _refusal(model, path)
        if why:
            self.close()
            raise UnsupportedModelError(why)

        # iSWA: the policy runs on the full-attention layers; llama.cpp keeps the sliding-window layers' window
        swa = swa_layers(model, path)
        self.managed_layers = [il for il, slides in enumerate(swa) if not slides]
        self.n_swa = llama_cpp.llama_model_n_swa(model) if any(swa) else 0
        if self.n_swa and policy != "full" and budget < swa_min_budget(self.n_swa):
            arch = _meta(model, "general.architecture")
            self.close()
            raise ValueError(
                f"model uses sliding-window attention ({arch}, window {self.n_swa}): budget must be at least "
                f"{swa_min_budget(self.n_swa)}, got {budget}; a smaller budget would evict tokens its "
                "sliding-window layers still attend to (docs/SWA.md)"
            )
        self.policy, self.budget, self.chunk, self.keep, self.n_sink = policy, budget, chunk, keep, n_sink
        self.evict_interval, self.flash_attn = evict_interval, flash_attn
        self.type_k, self.type_v = type_k, type_v
        self.n_layer = llama_cpp.llama_model_n_layer(model)
        self.memory = budget + max(chunk, evict_interval)  # most cells ever occupied
        if self.memory > _MAX_CELLS:
            self.close()
            raise ValueError(
                f"budget + max(chunk, evict_interval) = {self.memory} cells exceeds llama.cpp's limit of "
                f"{_MAX_CELLS}"
            )
        n_ubatch = min(n_ubatch, self.memory)  # a piece never exceeds memory: a larger ubatch only costs RAM
        vocab = llama_cpp.llama_model_get_vocab(model)
        self._vocab = vocab
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        too_big = self._size_error(n_ubatch, n_gpu_layers)
        if too_big:
            self.close()
            raise ValueError(too_big)

        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = self.memory
        cparams.n_batch = cparams.n_ubatch = n_ubatch
        cparams.n_seq_max = 1
        # no n_threads given: the team follows the cores other processes leave free (tova_cpp/threads.py)
        self._free_cores = FreeCores(default_threads()) if n_threads is None else None
        n_threads = self.n_threads = n_threads or default_threads()
        cparams.n_threads = cparams.n_threads_batch = n_threads
        cparams.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if flash_attn
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        cparams.type_k, cparams.type_v = tk, tv
        cparams.no_perf = True
        err = ffi.new("char[]", 512)
        engine = lib.tova_engine_create(
            POLICIES[policy], self.n_layer, budget, self.memory, not flash_attn, err, 512
        )
        if engine == ffi.NULL:
            self.close()
            raise ValueError(ffi.string(err).decode())
        self._engine = engine
        managed = ffi.new("uint8_t[]", [int(il in self.managed_layers) for il in range(self.n_layer)])
        for rc in (
            lib.tova_engine_set_keep(engine, keep),
            lib.tova_engine_set_n_sink(engine, n_sink),
            lib.tova_engine_set_layers(engine, managed, self.n_layer),
        ):
            if rc != 0:
                msg = ffi.string(lib.tova_engine_last_error(engine)).decode()
                self.close()
                raise ValueError(msg)
        self._callback = None
        if lib.tova_engine_needs_callback(engine):  # full, window: llama.cpp runs its graphs untouched
            self._callback = llama_cpp.ggml_backend_sched_eval_callback(
                int(ffi.cast("uintptr_t", lib.tova_eval_callback))
            )
            cparams.cb_eval = self._callback
            cparams.cb_eval_user_data = ctypes.c_void_p(int(ffi.cast("uintptr_t", engine)))
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            self.close()
            raise ModelLoadError(f"llama.cpp could not create a context of {self.memory} cells for {path}")
        self._ctx = ctx
        # llama.cpp pads n_ctx up to a multiple of 256: the engine tracks every real cell
        self.n_cells = llama_cpp.llama_n_ctx(ctx)
        self._check(lib.tova_engine_set_cells(engine, self.n_cells))
        self._check(lib.tova_engine_set_evict_interval(engine, evict_interval))
        lib.tova_engine_set_threads(engine, n_threads)
        self.n_ubatch = n_ubatch
        self._n_done = ffi.new("int32_t *")
        self.n_past = 0  # tokens seen: the next token's position

    def _size_error(self, n_ubatch: int, n_gpu_layers: int) -> str | None:
        """Why `memory` cells cannot fit in this machine's physical memory, or None (checked before any
        allocation: llama.cpp and the engine would otherwise abort with bad_alloc or swap the machine)."""
        phys = _physical_memory()
        if phys is None:
            return None
        try:
            kv = self._kv_row_bytes()
        except ValueError:  # per-layer sizes: bound by an F32 row of the full embedding
            kv = self.n_layer * 2 * 4 * llama_cpp.llama_model_n_embd(self._model)
        n_head = llama_cpp.llama_model_n_head(self._model)
        bookkeeping = 4 + 16 * self.n_layer  # csrc/engine.cpp: meta_pos, layer_pos, scores, acc per cell
        attention = n_ubatch * 4 * ((n_head if not self.flash_attn else 0) + 1)  # f32 KQ of one ubatch + mask
        per_cell = bookkeeping + (kv + attention if n_gpu_layers == 0 else 0)
        cells = -(-self.memory // 256) * 256
        if cells * per_cell <= phys:
            return None
        fits = max(0, phys // per_cell - 256 - (self.memory - self.budget))
        return (
            f"budget={self.budget} needs {self.memory} KV cells, about {cells * per_cell / 2**30:.1f} GiB "
            f"({per_cell} bytes per cell: KV rows, engine bookkeeping, one ubatch's attention), more than this "
            f"machine's {phys / 2**30:.1f} GiB of memory; with these settings a budget of at most about {fits} fits"
        )

    # -- native calls -------------------------------------------------------------------------------------
    def _check(self, rc: int) -> None:
        if rc != 0:
            msg = ffi.string(lib.tova_engine_last_error(self._engine)).decode()
            self.reset()  # the cache's content no longer matches the bookkeeping: start clean
            raise EngineError(f"tova engine error {rc}: {msg}; the session was reset")

    # -- public -------------------------------------------------------------------------------------------
    @_exclusive
    def eval(self, tokens, *, logits_all: bool = False, progress=None) -> np.ndarray | None:
        """Feed tokens (a prompt, or one decoded/teacher-forced token) into the bounded cache.

        Returns float32 logits [len(tokens), n_vocab] when logits_all, each computed from the cache as it was
        when that token was processed; else None (see `logits()`).
        progress: None or a callable (done, total) -> bool | None, called after each ubatch; returning False
        stops: eval raises `Cancelled`, and the tokens evaluated so far stay in the cache (n_past counts them).
        An exception raised by progress also stops eval (the session stays consistent) and propagates.
        One engine call (tova_engine_decode) runs the pieces, ubatches and cuts; any engine failure leaves the
        session consistent (bad input: nothing changed, ValueError) or reset (EngineError says so).
        """
        toks = _token_ids(tokens, self.n_vocab)
        if toks.size == 0:
            raise ValueError("eval needs at least one token")
        ids = np.ascontiguousarray(toks, dtype=np.int32)
        out = np.empty((ids.size, self.n_vocab), dtype=np.float32) if logits_all else None
        raised: list[BaseException] = []
        callback = ffi.NULL
        if progress is not None:

            def on_error(exc_type, exc, tb) -> None:
                raised.append(exc)  # returned as False: the engine stops after this ubatch

            callback = ffi.callback(
                "bool(int32_t, int32_t, void *)",
                lambda done, total, _: progress(done, total) is not False,
                error=False,
                onerror=on_error,
            )
        if self._free_cores is not None:
            self._set_threads(self._free_cores.poll())
        pos0, rc = self.n_past, None
        self._n_done[0] = 0
        try:
            rc = lib.tova_engine_decode(
                self._engine,
                ffi.cast("void *", self._ctx),
                ffi.from_buffer("int32_t[]", ids),
                ids.size,
                pos0,
                ffi.NULL if out is None else ffi.from_buffer("float[]", out),
                callback,
                ffi.NULL,
                self._n_done,
            )
        finally:
            # n_past follows the engine whatever lands here (a KeyboardInterrupt as the call returns included):
            # the tokens it evaluated, from 0 when it cleared everything after a failure
            cleared = rc is not None and rc < 0 and rc not in (lib.TOVA_ERR_ARG, lib.TOVA_CANCELLED)
            self.n_past = (0 if cleared else pos0) + self._n_done[0]
        if rc == 0:
            if raised:  # raised after the last ubatch: everything was evaluated
                raise raised[0]
            return out
        if rc == lib.TOVA_CANCELLED:
            if raised:
                raise raised[0]
            raise Cancelled(
                f"eval stopped by its progress callback after {self._n_done[0]} of {ids.size} tokens"
            )
        msg = ffi.string(lib.tova_engine_last_error(self._engine)).decode()
        if rc == lib.TOVA_ERR_ARG:  # refused before any decode: nothing changed
            raise ValueError(msg)
        raise EngineError(f"tova engine error {rc}: {msg}; the session was reset")

    @_exclusive
    def logits(self) -> np.ndarray:
        """Raw logits of the last evaluated position, float32 [n_vocab]."""
        if self.n_past == 0:
            raise RuntimeError("no token has been evaluated yet")
        restored = getattr(self, "_restored_logits", None)
        if restored is not None and restored[0] == self.n_past:  # loaded or truncated, not decoded since
            if restored[1] is None:
                raise RuntimeError("no logits after truncate(): evaluate a token first")
            return restored[1].copy()
        ptr = llama_cpp.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    @_exclusive
    def cell_positions(self) -> np.ndarray:
        """int32 [len(managed_layers), n_cells]: original position each managed layer holds in each cell, -1
        where empty. Managed: every layer, or the full-attention layers of a sliding-window model."""
        out = np.empty((self.n_layer, self.n_cells), dtype=np.int32)
        self._check(
            lib.tova_engine_cell_positions(self._engine, ffi.cast("int32_t *", out.ctypes.data), out.size)
        )
        return out[self.managed_layers]

    def kept_positions(self) -> np.ndarray:
        """int [len(managed_layers), budget]: the original positions each managed layer keeps, ascending, -1
        where empty."""
        cells = self.cell_positions()
        width = max(self.budget, int((cells >= 0).sum(axis=1).max()))
        out = np.full((len(cells), width), -1, dtype=np.int64)
        for layer, row in enumerate(cells):
            kept = np.sort(row[row >= 0])
            out[layer, : kept.size] = kept
        return out

    @_exclusive
    def kv_row_bytes(self) -> int:
        """Bytes one cell takes in all layers (K row + V row at type_k/type_v), from the GGUF metadata.
        Raises ValueError when a size varies per layer (no single row size)."""
        return self._kv_row_bytes()

    def _kv_row_bytes(self) -> int:
        arch = _meta(self._model, "general.architecture")

        def key(name: str) -> int | None:
            value = _meta(self._model, f"{arch}.{name}")
            try:
                return int(value) if value is not None else None
            except ValueError:  # per-layer arrays: not a single row size
                raise ValueError(
                    f"{arch}.{name} varies per layer ({value}); KV bytes are not derived"
                ) from None

        n_head = key("attention.head_count")
        n_head_kv = key("attention.head_count_kv") or n_head
        n_embd = key("embedding_length")
        if n_head is None or n_embd is None:
            raise ValueError(f"the GGUF lacks {arch}.attention.head_count / {arch}.embedding_length")

        def row(t: str, n: int) -> int:
            size, block = _TYPE_BLOCK[t]
            return n // block * size

        k = row(self.type_k, n_head_kv * (key("attention.key_length") or n_embd // n_head))
        v = row(self.type_v, n_head_kv * (key("attention.value_length") or n_embd // n_head))
        return self.n_layer * (k + v)

    @property
    @_exclusive
    def n_occupied(self) -> int:
        """Cells that hold a token (the same count in every managed layer)."""
        return int(lib.tova_engine_n_occupied(self._engine))

    @_exclusive
    def pos_window(self) -> tuple[int, int]:
        """(min, max) position llama.cpp's metadata holds for the sequence; (-1, -1) when empty. With
        sliding-window layers llama.cpp reports its window cache's minimum, which may exceed the managed one."""
        mem = llama_cpp.llama_get_memory(self._ctx)
        return (llama_cpp.llama_memory_seq_pos_min(mem, 0), llama_cpp.llama_memory_seq_pos_max(mem, 0))

    @_exclusive(require_open=False)
    def reset(self) -> None:
        """Clear the whole cache: the only way back, since an evicted cache cannot be rolled back."""
        self._reset()

    def _set_threads(self, n: int) -> None:
        if n != self.n_threads:
            llama_cpp.llama_set_n_threads(self._ctx, n, n)
            lib.tova_engine_set_threads(self._engine, n)
            self.n_threads = n

    def _reset(self) -> None:
        if self._ctx:
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
        if self._engine:
            lib.tova_engine_reset(self._engine)
        self.n_past = 0
        self._restored_logits = None

    @property
    @_exclusive
    def cache_buffer(self) -> str:
        """Name of the buffer holding the K cache ("CPU", "CUDA0", ...); "" before the first decode."""
        return ffi.string(lib.tova_engine_cache_buffer(self._engine)).decode()

    @_exclusive
    def engine_stats(self, reset: bool = False) -> dict[str, float]:
        """Cumulative engine costs (profiling), tova.h's TOVA_STAT_* in order: scored decodes, seconds capturing
        in the eval callback, seconds in the flash-attention scoring graph, cuts, seconds moving rows + removing
        metadata, and their finer splits; move_nodes and score_nodes count the mover's and the scoring graph's
        nodes (about a kernel each on a GPU); plain_decodes the decodes that ran without the eval callback."""
        self._require_open()
        out = ffi.new(f"double[{len(ENGINE_STATS)}]")
        self._check(lib.tova_engine_stats(self._engine, out, len(ENGINE_STATS), reset))
        return dict(zip(ENGINE_STATS, list(out), strict=True))

    @_exclusive
    def set_force_graph_mover(self, force: bool) -> None:
        """Take the device paths even when the cache is in host memory: rows moved by the ggml graph and, with
        flash attention off, the attention sums formed by a ggml graph instead of read row by row (tests)."""
        lib.tova_engine_set_force_graph_mover(self._engine, force)

    @_exclusive
    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        self._require_tokenizer()
        data = text.encode()
        n_max = len(data) + 16
        for _ in range(2):
            buf = (llama_cpp.llama_token * n_max)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, parse_special)
            if n >= 0:
                return list(buf[:n])
            if -n <= n_max:  # not a "buffer too small" answer
                break
            n_max = -n  # llama_tokenize returns -(tokens needed) when the buffer is too small
        raise TokenizerError(f"llama.cpp could not tokenize the text (code {n})")

    @_exclusive
    def detokenize(self, tokens) -> str:
        self._require_tokenizer()
        tokens = _token_ids(tokens, self.n_vocab)
        out = b""
        buf = ctypes.create_string_buffer(256)
        for t in tokens:
            n = llama_cpp.llama_token_to_piece(self._vocab, int(t), buf, len(buf), 0, False)
            out += buf.raw[: max(n, 0)]
        return out.decode(errors="replace")

    @_exclusive
    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The model's own chat template (GGUF tokenizer.chat_template) through llama-cpp-python's Jinja2
        formatter, with the assistant turn opened."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = llama_cpp.llama_model_chat_template(self._model, None)
        if not template:
            raise ValueError("the model has no chat template; pass raw text instead")

        def special(tok: int) -> str:
            if not 0 <= tok < self.n_vocab:  # no such token (e.g. a vocabulary without BOS): llama.cpp aborts
                return ""
            buf = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self._vocab, tok, buf, len(buf), 0, True)
            return buf.raw[: max(n, 0)].decode(errors="replace")

        fmt = Jinja2ChatFormatter(
            template.decode(),
            eos_token=special(llama_cpp.llama_vocab_eos(self._vocab)),
            bos_token=special(llama_cpp.llama_vocab_bos(self._vocab)),
        )
        return fmt(messages=messages).prompt

    @_exclusive
    def is_eog(self, token: int) -> bool:
        (token,) = _token_ids([token], self.n_vocab)
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, int(token)))

    # -- save and resume (tova_cpp/state.py, docs/STATE.md) -------------------------------------------
    def state_settings(self) -> dict:
        """What a saved state must agree on to continue exactly: the engine's settings, the cache layout and
        the micro-batch size (it splits prompts, hence the numerics)."""
        keys = ("policy", "budget", "keep", "n_sink", "chunk", "evict_interval", "n_ubatch", "flash_attn")
        out = {k: getattr(self, k) for k in keys}
        out.update(type_k=self.type_k, type_v=self.type_v, n_layer=self.n_layer, n_vocab=self.n_vocab)
        out["n_cells"] = self.n_cells
        return out

    def model_identity(self) -> str:
        """The model file's identity as a saved state records it (tova_cpp.state.model_identity)."""
        if getattr(self, "_model_id", None) is None:
            from .state import model_identity

            self._model_id = model_identity(self.model_path)
        return self._model_id

    @_exclusive
    def save_state(self):
        """The whole bounded conversation as a tova_cpp.state.TovaState (llama_cpp.Llama.save_state's name):
        llama.cpp's state of sequence 0, the engine's per-layer bookkeeping, the last logits. Changes nothing."""
        from .state import TovaState, parse_engine_state, parse_seq_blob

        self._require_open()
        n = llama_cpp.llama_state_seq_get_size(self._ctx, 0)
        buf = (ctypes.c_uint8 * n)()
        if llama_cpp.llama_state_seq_get_data(self._ctx, buf, n, 0) != n:
            raise EngineError("llama_state_seq_get_data did not write the sequence state")
        blob = bytes(buf)
        size = ffi.new("size_t *")
        if lib.tova_engine_state_size(self._engine, size) != 0:
            raise EngineError("tova_engine_state_size failed")
        engine = ffi.new("uint8_t[]", size[0])
        if lib.tova_engine_export_state(self._engine, engine, size[0]) != 0:
            raise EngineError(ffi.string(lib.tova_engine_last_error(self._engine)).decode())
        engine = bytes(ffi.buffer(engine, size[0]))
        # llama.cpp writes cells in ascending index order, as the engine does: the positions must agree
        if not np.array_equal(parse_seq_blob(blob).positions, parse_engine_state(engine).meta):
            raise EngineError("llama.cpp's cells disagree with the engine's bookkeeping; call reset()")
        restored = getattr(self, "_restored_logits", None)
        truncated = restored is not None and restored[0] == self.n_past and restored[1] is None
        if self.n_past and not truncated:
            scores = self.logits()[None, :]
        else:  # nothing evaluated, or truncated since: no logits until the next eval, after a load too
            scores = np.zeros((0, self.n_vocab), np.float32)
        return TovaState(
            n_tokens=self.n_past,
            scores=scores,
            llama_state=blob,
            engine_state=engine,
            model_id=self.model_identity(),
            settings=self.state_settings(),
        )

    @_exclusive
    def load_state(self, state) -> None:
        """Continue from `state` (from save_state of a session of the same model and settings), exactly as
        the saved session would have. StateError when it does not fit; the session is then as it was."""
        from .state import check_fits, parse_engine_state, parse_seq_blob

        self._require_open()
        seq, cells = check_fits(state, self.model_identity(), self.state_settings(), self.n_vocab)
        if cells.meta.size and cells.cells[-1] >= self.n_cells:
            raise StateError("the state's llama.cpp cells, engine bookkeeping and token count disagree")
        backup = self.save_state() if self.n_past else None
        try:
            self._restore(state, seq, cells.cells)
        except Exception:
            if backup is None:
                self.reset()
            else:
                self._restore(
                    backup, parse_seq_blob(backup.llama_state), parse_engine_state(backup.engine_state).cells
                )
            raise

    def _restore(self, state, seq, cells: np.ndarray) -> None:
        from .state import place_cells

        mem = llama_cpp.llama_get_memory(self._ctx)
        self.reset()  # an empty cache with its search head at cell 0: the rows land where place_cells says
        if state.n_tokens == 0:
            return
        blob, filler = place_cells(state.llama_state, seq, cells)
        buf = (ctypes.c_uint8 * len(blob)).from_buffer_copy(blob)
        if llama_cpp.llama_state_seq_set_data(self._ctx, buf, len(blob), 0) != len(blob):
            raise StateError("llama.cpp refused the sequence state")
        if filler >= 0 and not llama_cpp.llama_memory_seq_rm(mem, 0, filler, -1):
            raise StateError("llama.cpp refused to free the filler cells")
        window = (state.n_tokens - len(cells), state.n_tokens - 1)
        if self.pos_window() != window:
            raise StateError(
                f"llama.cpp holds positions {self.pos_window()} after the load, expected {window}"
            )
        data = ffi.from_buffer(state.engine_state)
        if lib.tova_engine_import_state(self._engine, data, len(state.engine_state)) != 0:
            raise StateError(ffi.string(lib.tova_engine_last_error(self._engine)).decode())
        self.n_past = state.n_tokens
        last = np.array(state.scores[0], dtype=np.float32) if len(state.scores) else None
        self._restored_logits = (self.n_past, last)

    @_exclusive
    def truncate(self, n_past: int) -> None:
        """Forget the newest tokens: keep positions < n_past (a reply cut by a stop string), without
        re-evaluating anything. The next eval continues at position n_past.

        Differs from a run that never saw those tokens (docs/STATE.md): the evictions they caused stay, h2o's
        accumulators keep their attention, and a layer that had already evicted some of them evicts as many
        other rows so every layer keeps the same count (h2o and sink by their own rule; tova, window and full
        the oldest rows after the protected prefix, since no attention row of the new newest token exists).
        n_past must be above the oldest position the cache holds (else ValueError; use reset)."""
        self._require_open()
        if isinstance(n_past, bool) or not isinstance(n_past, int) or not 0 <= n_past <= self.n_past:
            raise ValueError(f"n_past must be an integer in [0, {self.n_past}], got {n_past!r}")
        if n_past == self.n_past:
            return
        if n_past == 0:
            self.reset()
            return
        rc = lib.tova_engine_truncate(self._engine, ffi.cast("void *", self._ctx), n_past)
        if rc == -1:  # TOVA_ERR_ARG: refused before anything changed
            raise ValueError(ffi.string(lib.tova_engine_last_error(self._engine)).decode())
        self._check(rc)
        self.n_past = n_past
        self._restored_logits = (n_past, None)  # the context's logits are those of a removed token

    @_exclusive
    def save(self, path: str | os.PathLike) -> int:
        """Write the conversation to `path` (atomically; tova_cpp/state.py has the format). Returns bytes."""
        from .state import write_file

        return write_file(path, self.save_state())

    @_exclusive
    def load(self, path: str | os.PathLike) -> None:
        """Continue the conversation saved in `path`. StateError when the file is truncated, corrupted or
        saved with another model or settings; the session is then as it was."""
        from .state import read_file

        self.load_state(read_file(path))

    def _require_open(self) -> None:
        if not self._ctx:
            raise SessionClosedError("the session is closed: its model and context were freed")

    def _require_tokenizer(self) -> None:
        if llama_cpp.llama_vocab_type(self._vocab) == llama_cpp.LLAMA_VOCAB_TYPE_NONE:
            raise TokenizerError(
                "the model has no tokenizer (GGUF tokenizer.ggml.model is 'none'): pass token ids to eval"
            )

    @_exclusive(require_open=False)
    def close(self) -> None:
        """Free the context, engine and model; closing twice is fine. Refused while another thread is inside."""
        self._close()

    def _close(self) -> None:
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._engine:
            lib.tova_engine_free(self._engine)
            self._engine = None
        if self._model:
            release_model(self._model)
            self._model = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_lock", None) is not None:  # __init__ may have failed before setting it
            self.close()
