"""Many sequences in one context: a bounded KV cache per sequence, decoded together (continuous batching).

`BatchSession` holds one model and one llama.cpp context in which every sequence (a llama.cpp seq_id) has its
own KV stream (kv_unified=False, the default: attention runs per sequence over its own cells only) or shares one
unified KV cache with the others (kv_unified=True: one stream of cells, each owned by one sequence; attention
runs over all of them, the others' masked). Each sequence has its own budget, keep and evict_interval (the
policy is the session's); sequences are added, reset and removed at any time while the others continue.
`step` evaluates tokens of several sequences in shared llama_decode calls (each sequence's next token, and
prompt pieces of new ones); each sequence is cut to its own budget by its own newest token's attention, over its
own cells only (docs/ARCHITECTURE.md, section "Many sequences"). The semantics per sequence are Session's
(tova_cpp/session.py): a sequence run here keeps the same per-layer sets as the same sequence run alone.

Cells rule: each sequence reserves memory = budget + max(chunk, evict_interval) cells while it exists (the most
it ever occupies: a piece of up to `chunk` tokens, or evict_interval decodes, on top of its budget).
Per-sequence streams: llama.cpp gives each of the n_seq_max sequence ids a stream of
stream_cells = PAD256(n_ctx / n_seq_max) cells; `add` refuses (CapacityError) a sequence whose memory exceeds
stream_cells, or when n_seq_max sequences exist. Unified: the context holds n_cells = n_ctx rounded up to a
multiple of 256; `add` refuses a sequence whose memory exceeds the cells no other sequence reserves. n_ctx=None
sizes the context for n_seq_max sequences at the default settings.

`stream_generate_batch` / `generate_batch` generate from many prompts at once with `Llama`'s sampling (one
llama.cpp sampler chain per sequence), admitting queued prompts as finished sequences free their cells.
"""

from __future__ import annotations

import codecs
import ctypes
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np

from ._ffi import ffi, lib
from .errors import (
    CapacityError,
    EngineError,
    ModelLoadError,
    SessionClosedError,
    StateError,
    UnknownSequenceError,
    UnsupportedModelError,
)
from .generate import Sampler, _stop_hold, check_max_tokens, check_stops, log_normalizer, token_piece
from .session import (
    _MAX_CELLS,
    DEFAULT_N_SINK,
    ENGINE_STATS,
    GGML_MAX_N_THREADS,
    POLICIES,
    Session,
    _cache_type,
    _exclusive,
    _physical_memory,
    _refusal,
    _token_ids,
    acquire_model,
    default_threads,
    guard_cuda_graphs,
    release_model,
    swa_layers,
)
from .threads import FreeCores

# BatchSession.step's own split: building the C arguments, the C call, the result mapping
_STEP_STATS = ("steps", "args_s", "call_s", "result_s")


def _int(name: str, value, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be an integer {rng}, got {value!r}")
    return value


class BatchSession:
    """One model, one context, many sequences, each with its own bounded KV cache (see the module docstring for
    the cells rule). A session serves one thread at a time (another thread gets SessionBusyError); after close()
    every method raises SessionClosedError. Sequence ids that are not active raise UnknownSequenceError.
    On a GPU build, the first GPU context of the process being a BatchSession (n_gpu_layers != 0) turns
    llama.cpp's CUDA graphs off for the process (GGML_CUDA_DISABLE_GRAPHS=1; why, and the opt-out: session.py
    guard_cuda_graphs)."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        n_seq_max: int,
        n_ctx: int | None = None,
        budget: int,
        policy: str = "tova",
        keep: int = 0,
        evict_interval: int = 1,
        chunk: int = 256,
        n_ubatch: int | None = None,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        flash_attn: bool = False,
        type_k: str = "f16",
        type_v: str = "f16",
        n_sink: int | None = None,
        kv_unified: bool = False,
        verbose: bool = False,
    ) -> None:
        self._lock = threading.RLock()
        self._ctx = self._model = self._engine = None
        n_seq_max = _int("n_seq_max", n_seq_max, 1, lib.TOVA_MAX_SEQ)
        budget = _int("budget", budget, 1)
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose one of {sorted(POLICIES)}")
        keep = _int("keep", keep, 0, budget - 1)
        evict_interval = _int("evict_interval", evict_interval, 1)
        chunk = _int("chunk", chunk, 1)
        if n_sink is not None and policy != "sink":
            raise ValueError(f"n_sink applies to policy 'sink' only (policy is {policy!r})")
        if n_sink is None:
            n_sink = DEFAULT_N_SINK if policy == "sink" else 0
        n_sink = _int("n_sink", n_sink, 0, budget - 1)
        if n_threads is not None:
            _int("n_threads", n_threads, 1, GGML_MAX_N_THREADS)
        if not isinstance(flash_attn, bool):
            raise ValueError(f"flash_attn must be True or False, got {flash_attn!r}")
        if flash_attn and policy == "h2o":
            raise ValueError("policy h2o needs flash_attn=False: it accumulates every query's attention row")
        tk, tv = _cache_type(type_k), _cache_type(type_v)
        if type_v not in ("f32", "f16", "bf16") and not flash_attn:
            raise ValueError(f"a quantized V cache ({type_v}) needs flash attention in llama.cpp")
        self.policy, self.budget, self.keep, self.evict_interval = policy, budget, keep, evict_interval
        self.chunk, self.n_sink, self.flash_attn = chunk, n_sink, flash_attn
        self.type_k, self.type_v, self.n_seq_max = type_k, type_v, n_seq_max
        if not isinstance(kv_unified, bool):
            raise ValueError(f"kv_unified must be True or False, got {kv_unified!r}")
        self.kv_unified = kv_unified
        default_cells = n_seq_max * self._stream_cells(self.memory_of(budget, evict_interval))
        n_ctx = default_cells if n_ctx is None else _int("n_ctx", n_ctx, 1, _MAX_CELLS)
        if n_ctx > _MAX_CELLS:
            raise ValueError(f"n_ctx = {n_ctx} cells exceeds llama.cpp's limit of {_MAX_CELLS}")
        if self._stream_cells(n_ctx // n_seq_max if not kv_unified else n_ctx) < self.memory_of(
            budget, evict_interval
        ):
            raise ValueError(
                f"n_ctx = {n_ctx} cells cannot hold one sequence of budget + max(chunk, evict_interval) = "
                f"{self.memory_of(budget, evict_interval)} cells"
            )
        # one step carries every sequence's next token and a prompt piece
        n_ubatch = max(chunk, n_seq_max) if n_ubatch is None else _int("n_ubatch", n_ubatch, 1)
        n_ubatch = min(n_ubatch, n_ctx)
        path = Path(model_path)
        self.model_path = str(path)
        guard_cuda_graphs(n_gpu_layers, many_sequences=True)
        self._model = model = acquire_model(path, n_gpu_layers, verbose)
        why = _refusal(model, path)
        if why is None and any(s for s in swa_layers(model, path) if s is True):
            why = (
                "sliding-window models (gemma2/3, gpt-oss) are not supported with many sequences; use Session"
            )
        if why:
            self.close()
            raise UnsupportedModelError(why)
        self.n_layer = llama_cpp.llama_model_n_layer(model)
        self.managed_layers = list(range(self.n_layer))
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        too_big = self._size_error(n_ctx, n_ubatch, n_gpu_layers)
        if too_big:
            self.close()
            raise ValueError(too_big)

        err = ffi.new("char[]", 512)
        engine = lib.tova_engine_create(
            POLICIES[policy],
            self.n_layer,
            budget,
            self.memory_of(budget, evict_interval),
            not flash_attn,
            err,
            512,
        )
        if engine == ffi.NULL:
            self.close()
            raise ValueError(ffi.string(err).decode())
        self._engine = engine
        for rc in (
            lib.tova_engine_set_n_sink(engine, n_sink),
            lib.tova_engine_set_n_seq(engine, n_seq_max),
            lib.tova_engine_set_streams(engine, not kv_unified),
        ):
            if rc != 0:
                msg = self._error()
                self.close()
                raise ValueError(msg)

        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = cparams.n_ubatch = n_ubatch
        cparams.n_seq_max = n_seq_max
        # unified: one stream of cells shared by all sequences, each reserving its share; else one stream each
        cparams.kv_unified = kv_unified
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
        self._callback = None
        if lib.tova_engine_needs_callback(engine):
            self._callback = llama_cpp.ggml_backend_sched_eval_callback(
                int(ffi.cast("uintptr_t", lib.tova_eval_callback))
            )
            cparams.cb_eval = self._callback
            cparams.cb_eval_user_data = ctypes.c_void_p(int(ffi.cast("uintptr_t", engine)))
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            self.close()
            raise ModelLoadError(
                f"llama.cpp could not create a context of {n_ctx} cells and {n_seq_max} sequences for {path}"
            )
        self._ctx = ctx
        # all cells: n_ctx padded to a multiple of 256 (streams: n_seq_max x PAD256(n_ctx / n_seq_max))
        self.n_cells = llama_cpp.llama_n_ctx(ctx)
        self.stream_cells = llama_cpp.llama_n_ctx_seq(ctx)  # cells of one stream (unified: all of them)
        self._call(lib.tova_engine_set_cells(engine, self.n_cells))
        lib.tova_engine_set_threads(engine, n_threads)
        self.n_ubatch = n_ubatch
        self._seqs: dict[int, dict] = {}  # active id -> its settings
        # id -> logits of its last evaluated token (None: that step ran with logits=False)
        self._last: dict[int, np.ndarray | None] = {}
        self._step_stats = dict.fromkeys(_STEP_STATS, 0.0)

    def memory_of(self, budget: int, evict_interval: int) -> int:
        """Cells a sequence reserves: budget + max(chunk, evict_interval)."""
        return budget + max(self.chunk, evict_interval)

    def _stream_cells(self, cells: int) -> int:
        """Per-sequence streams: llama.cpp rounds each stream up to a multiple of 256 cells."""
        return cells if self.kv_unified else -(-cells // 256) * 256

    def _size_error(self, n_ctx: int, n_ubatch: int, n_gpu_layers: int) -> str | None:
        phys = _physical_memory()
        if phys is None:
            return None
        try:
            kv = Session._kv_row_bytes(self)
        except ValueError:
            kv = self.n_layer * 2 * 4 * llama_cpp.llama_model_n_embd(self._model)
        n_head = llama_cpp.llama_model_n_head(self._model)
        per_cell = 8 + 16 * self.n_layer + n_ubatch * 4 * ((n_head if not self.flash_attn else 0) + 1)
        if n_gpu_layers == 0:
            per_cell += kv
        cells = -(-n_ctx // 256) * 256
        if cells * per_cell <= phys:
            return None
        return (
            f"n_ctx={n_ctx} cells need about {cells * per_cell / 2**30:.1f} GiB ({per_cell} bytes per cell: KV "
            f"rows, engine bookkeeping, one ubatch's attention), more than this machine's {phys / 2**30:.1f} "
            "GiB; lower n_ctx, n_seq_max or n_ubatch"
        )

    # -- native calls -------------------------------------------------------------------------------------
    def _error(self) -> str:
        return ffi.string(lib.tova_engine_last_error(self._engine)).decode()

    def _call(self, rc: int) -> int:
        if rc < 0:
            raise EngineError(f"tova engine error {rc}: {self._error()}")
        return rc

    def _require_open(self) -> None:
        if not self._ctx:
            raise SessionClosedError("the batch session is closed: its model and context were freed")

    def _require_seq(self, seq) -> int:
        if isinstance(seq, bool) or not isinstance(seq, (int, np.integer)) or int(seq) not in self._seqs:
            raise UnknownSequenceError(
                f"sequence {seq!r} is not in this session (active: {sorted(self._seqs)}); add() returns ids"
            )
        return int(seq)

    # -- sequences ----------------------------------------------------------------------------------------
    @_exclusive
    def can_add(self, budget: int | None = None, evict_interval: int | None = None) -> bool:
        """Whether add(budget=..., evict_interval=...) would succeed now."""
        budget = self.budget if budget is None else _int("budget", budget, 1)
        ev = self.evict_interval if evict_interval is None else _int("evict_interval", evict_interval, 1)
        free = self._call(lib.tova_engine_cells_free(self._engine))
        return len(self._seqs) < self.n_seq_max and self.memory_of(budget, ev) <= free

    @_exclusive
    def add(
        self, *, budget: int | None = None, keep: int | None = None, evict_interval: int | None = None
    ) -> int:
        """A new empty sequence with its own settings (default: the session's); returns its id (the lowest
        free one). CapacityError when its cells do not fit beside the other sequences' (nothing changed)."""
        budget = self.budget if budget is None else _int("budget", budget, 1)
        keep = self.keep if keep is None else keep
        keep = _int("keep", keep, 0, budget - 1)
        ev = self.evict_interval if evict_interval is None else _int("evict_interval", evict_interval, 1)
        if self.policy == "sink" and self.n_sink >= budget:
            raise ValueError(f"budget ({budget}) must exceed n_sink ({self.n_sink})")
        free_ids = [i for i in range(self.n_seq_max) if i not in self._seqs]
        if not free_ids:
            raise CapacityError(f"all {self.n_seq_max} sequence ids are in use (n_seq_max); remove one first")
        seq, memory = free_ids[0], self.memory_of(budget, ev)
        rc = lib.tova_engine_seq_add(self._engine, seq, budget, memory, keep, ev)
        if rc == lib.TOVA_ERR_CAPACITY:
            raise CapacityError(self._error())
        if rc == lib.TOVA_ERR_ARG:
            raise ValueError(self._error())
        self._call(rc)
        self._seqs[seq] = {"budget": budget, "keep": keep, "evict_interval": ev, "memory": memory}
        return seq

    @_exclusive
    def remove(self, seq: int) -> None:
        """Free the sequence's cells and its reservation; its id may be returned by a later add()."""
        seq = self._require_seq(seq)
        rc = lib.tova_engine_seq_remove(self._engine, ffi.cast("void *", self._ctx), seq)
        del self._seqs[seq]
        self._last.pop(seq, None)
        self._call(rc)

    @_exclusive
    def reset(self, seq: int) -> None:
        """Empty the sequence (its next token is position 0); it keeps its id and settings."""
        seq = self._require_seq(seq)
        self._last.pop(seq, None)
        self._call(lib.tova_engine_seq_reset(self._engine, ffi.cast("void *", self._ctx), seq))

    @property
    @_exclusive
    def sequences(self) -> list[int]:
        """Active sequence ids, ascending."""
        return sorted(self._seqs)

    def settings(self, seq: int) -> dict:
        """The sequence's budget, keep, evict_interval and reserved cells (memory)."""
        return dict(self._seqs[self._require_seq(seq)])

    # -- evaluation ---------------------------------------------------------------------------------------
    @_exclusive
    def step(self, batch: Mapping[int, Sequence[int]], logits: bool = True) -> dict[int, np.ndarray]:
        """One batched step: each sequence of `batch` evaluates its tokens (1 or more: its next token, or a
        prompt), all together in shared llama_decode calls. Returns each sequence's last-token logits
        (float32 [n_vocab]). logits=False skips copying them (n_seqs x n_vocab floats per step; a benchmark's
        or a caller's that samples elsewhere): the result is empty and logits(seq) raises for these sequences
        until their next step with logits=True; kept sets and later logits are the same either way. Bad input
        (unknown id, empty token list, bad token ids): ValueError subclasses, nothing changed. An engine failure
        after decoding began empties every sequence (EngineError says so)."""
        t0 = time.perf_counter()
        if not isinstance(batch, Mapping) or not batch:
            raise ValueError("step takes a non-empty mapping {sequence id: tokens}")
        if not isinstance(logits, bool):
            raise ValueError(f"logits must be True or False, got {logits!r}")
        seqs, counts, flat = [], [], []
        n_vocab = self.n_vocab
        for seq, tokens in batch.items():
            seq = self._require_seq(seq)
            # a decode step's [token]: checked here, not through numpy (a step of 128 sequences pays it 128 times)
            if (
                type(tokens) is list
                and len(tokens) == 1
                and type(tokens[0]) is int
                and 0 <= tokens[0] < n_vocab
            ):
                flat.append(tokens[0])
                n = 1
            else:
                toks = _token_ids(tokens, n_vocab)
                if toks.size == 0:
                    raise ValueError(f"sequence {seq}: at least one token per sequence")
                flat.extend(toks.tolist())
                n = toks.size
            seqs.append(seq)
            counts.append(n)
        ids = np.array(flat, dtype=np.int32)
        seq_arr = np.asarray(seqs, dtype=np.int32)
        cnt_arr = np.asarray(counts, dtype=np.int32)
        out = np.empty((len(seqs), self.n_vocab), dtype=np.float32) if logits else None
        if self._free_cores is not None:
            self._set_threads(self._free_cores.poll())
        t1 = time.perf_counter()
        rc = lib.tova_engine_decode_batch(
            self._engine,
            ffi.cast("void *", self._ctx),
            ffi.from_buffer("int32_t[]", seq_arr),
            ffi.from_buffer("int32_t[]", cnt_arr),
            len(seqs),
            ffi.from_buffer("int32_t[]", ids),
            ffi.from_buffer("float[]", out) if logits else ffi.NULL,
        )
        t2 = time.perf_counter()
        if rc == lib.TOVA_ERR_ARG:
            raise ValueError(self._error())
        if rc != 0:
            self._last.clear()
            raise EngineError(f"tova engine error {rc}: {self._error()}; every sequence was emptied")
        result = {}
        for i, seq in enumerate(seqs):  # rows of this call's own array: nothing later writes them
            self._last[seq] = result[seq] = out[i] if logits else None
        t3 = time.perf_counter()
        st = self._step_stats
        st["steps"] += 1
        st["args_s"] += t1 - t0
        st["call_s"] += t2 - t1
        st["result_s"] += t3 - t2
        return result if logits else {}

    def eval(self, seq: int, tokens: Sequence[int]) -> np.ndarray:
        """Evaluate tokens (a prompt, or one token) of one sequence; returns its last token's logits."""
        return self.step({seq: tokens})[seq]

    @_exclusive
    def logits(self, seq: int) -> np.ndarray:
        """Logits of the sequence's last evaluated token, float32 [n_vocab]."""
        seq = self._require_seq(seq)
        if seq not in self._last:
            raise RuntimeError(f"sequence {seq} has no evaluated token")
        if self._last[seq] is None:
            raise RuntimeError(
                f"sequence {seq}: its last step ran with logits=False, which does not keep the logits; "
                "step it with logits=True to read them"
            )
        return self._last[seq].copy()

    @_exclusive
    def n_past(self, seq: int) -> int:
        """Tokens the sequence has seen (its next token's position)."""
        return self._call(lib.tova_engine_seq_n_past(self._engine, self._require_seq(seq)))

    @_exclusive
    def n_occupied(self, seq: int) -> int:
        """Cells the sequence occupies (the same count in every layer)."""
        return self._call(lib.tova_engine_seq_n_occupied(self._engine, self._require_seq(seq)))

    @_exclusive
    def kept_positions(self, seq: int) -> np.ndarray:
        """int [n_layer, max(budget, occupied)]: the original positions each layer keeps for the sequence,
        ascending, -1 where empty (Session.kept_positions)."""
        seq = self._require_seq(seq)
        pos = np.empty((self.n_layer, self.n_cells), dtype=np.int32)
        owner = np.empty(self.n_cells, dtype=np.int32)
        self._call(
            lib.tova_engine_cell_positions(self._engine, ffi.cast("int32_t *", pos.ctypes.data), pos.size)
        )
        self._call(
            lib.tova_engine_cell_seqs(self._engine, ffi.cast("int32_t *", owner.ctypes.data), owner.size)
        )
        mine = pos[:, owner == seq]
        width = max(self._seqs[seq]["budget"], mine.shape[1])
        out = np.full((self.n_layer, width), -1, dtype=np.int64)
        out[:, : mine.shape[1]] = np.sort(mine, axis=1)
        return out

    @_exclusive
    def pos_window(self, seq: int) -> tuple[int, int]:
        """(min, max) position llama.cpp's metadata holds for the sequence; (-1, -1) when empty."""
        seq = self._require_seq(seq)
        mem = llama_cpp.llama_get_memory(self._ctx)
        return (llama_cpp.llama_memory_seq_pos_min(mem, seq), llama_cpp.llama_memory_seq_pos_max(mem, seq))

    @_exclusive
    def engine_stats(self, reset: bool = False) -> dict[str, float]:
        """Cumulative engine costs (Session.engine_stats), over all sequences, with the finer split of
        tova_engine_stats (tova.h, TOVA_STAT_*): decode_s (llama_decode and the wait for its graph; contains
        capture_s), score_build_s / score_compute_s / score_read_s (parts of score_s), choose_s / move_s (parts
        of cut_s), logits_s, step_s (the whole C call), move_nodes and score_nodes (the mover's and the scoring
        graph's nodes, about a kernel each on a GPU), plain_decodes (decodes run without the eval callback); and
        step's own Python split (steps, args_s, call_s, result_s: building the arguments, the C call,
        the returned mapping). reset=True zeroes all of them."""
        out = ffi.new(f"double[{len(ENGINE_STATS)}]")
        self._call(lib.tova_engine_stats(self._engine, out, len(ENGINE_STATS), reset))
        stats = dict(zip(ENGINE_STATS, list(out), strict=True))
        stats.update(self._step_stats)
        if reset:
            self._step_stats = dict.fromkeys(_STEP_STATS, 0.0)
        return stats

    # -- park and resume one sequence (tova_cpp/state.py, docs/STATE.md) -------------------------------------
    def state_settings(self, seq: int) -> dict:
        """What a saved sequence must agree on to continue exactly: the engine's settings, the sequence's own
        budget, keep and evict_interval, the cache types. Session's also holds n_ubatch and the context's cells;
        a sequence of a batch shares its decodes with whatever else runs, so neither is part of its state."""
        q = self._seqs[self._require_seq(seq)]
        return self._settings(q["budget"], q["keep"], q["evict_interval"])

    def _settings(self, budget: int, keep: int, evict_interval: int) -> dict:
        return {
            "policy": self.policy,
            "budget": budget,
            "keep": keep,
            "n_sink": self.n_sink,
            "chunk": self.chunk,
            "evict_interval": evict_interval,
            "flash_attn": self.flash_attn,
            "type_k": self.type_k,
            "type_v": self.type_v,
            "n_layer": self.n_layer,
            "n_vocab": self.n_vocab,
        }

    model_identity = Session.model_identity

    def _require_unified(self) -> None:
        # llama.cpp writes and reads a sequence's state per stream, and the engine's import plan mirrors the
        # unified cache's slot search only (docs/STATE.md); refused before anything is read or changed
        if not self.kv_unified:
            raise StateError(
                "saving or loading one sequence needs BatchSession(kv_unified=True); per-sequence streams "
                "(the default) do not support it yet"
            )

    @_exclusive
    def save_state(self, seq: int):
        """One sequence's bounded conversation as a tova_cpp.state.TovaState (Session.save_state's format):
        llama.cpp's state of that sequence, the engine's per-layer bookkeeping of its cells, its last logits.
        Changes nothing; the other sequences are not read. Needs kv_unified=True (StateError otherwise: parking
        a sequence of per-sequence streams is not supported yet)."""
        from .state import TovaState, parse_engine_state, parse_seq_blob

        seq = self._require_seq(seq)
        self._require_unified()
        n = llama_cpp.llama_state_seq_get_size(self._ctx, seq)
        buf = (ctypes.c_uint8 * n)()
        if llama_cpp.llama_state_seq_get_data(self._ctx, buf, n, seq) != n:
            raise EngineError("llama_state_seq_get_data did not write the sequence state")
        blob = bytes(buf)
        size = ffi.new("size_t *")
        self._call(lib.tova_engine_seq_state_size(self._engine, seq, size))
        engine = ffi.new("uint8_t[]", size[0])
        self._call(lib.tova_engine_seq_export_state(self._engine, seq, engine, size[0]))
        engine = bytes(ffi.buffer(engine, size[0]))
        # llama.cpp writes the sequence's cells in ascending index order, as the engine does
        if not np.array_equal(parse_seq_blob(blob).positions, parse_engine_state(engine).meta):
            raise EngineError(f"llama.cpp's cells of sequence {seq} disagree with the engine's bookkeeping")
        last = self._last.get(seq)
        return TovaState(
            n_tokens=self.n_past(seq),
            scores=np.zeros((0, self.n_vocab), np.float32) if last is None else last[None, :].copy(),
            llama_state=blob,
            engine_state=engine,
            model_id=self.model_identity(),
            settings=self.state_settings(seq),
        )

    @_exclusive
    def load_state(self, seq: int | None, state) -> int:
        """Continue a saved sequence (from save_state of any BatchSession, or a Session, of the same model and
        settings) in sequence `seq`, replacing what it held, or in a new sequence when seq is None (added with
        the state's budget, keep and evict_interval). Returns the sequence id. Its cells go back to the indices
        they had when saved where those are free (then it computes over the same layout: the continuation is
        bit-identical when the rest of the cache is laid out as it was), else to the lowest free cells;
        no other sequence's cells are read or written. StateError when the state does not fit (another model,
        budget, keep, policy, cache type; damaged), CapacityError when a new sequence does not fit beside the
        others: nothing changed then."""
        from .state import TovaState, check_fits

        if not isinstance(state, TovaState):
            raise TypeError(f"load_state takes a TovaState, got {type(state).__name__}")
        self._require_unified()
        if seq is None:
            budget, keep, ev = (state.settings.get(k) for k in ("budget", "keep", "evict_interval"))
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in (budget, keep, ev)):
                raise StateError("the state names no budget, keep and evict_interval")
            settings = self._settings(budget, keep, ev)
        else:
            settings = self.state_settings(seq)
        parsed, _ = check_fits(state, self.model_identity(), settings, self.n_vocab)
        added = seq is None
        if added:
            seq, backup = self.add(budget=budget, keep=keep, evict_interval=ev), None
        else:
            backup = self.save_state(seq) if self.n_past(seq) else None
        try:
            self._restore_seq(seq, state, parsed)
        except Exception:
            if added:
                self.remove(seq)
            else:  # back to what it held: its cells are free again, so they return to the same indices
                self.reset(seq)
                if backup is not None:
                    from .state import parse_seq_blob

                    self._restore_seq(seq, backup, parse_seq_blob(backup.llama_state))
            raise
        return seq

    def _restore_seq(self, seq: int, state, parsed) -> None:
        from .state import place_layout

        self.reset(seq)  # empty: the plan sees its cells as free
        if state.n_tokens == 0:
            return
        data = ffi.from_buffer(state.engine_state)
        layout = np.empty(self.n_cells, dtype=np.int32)
        m = lib.tova_engine_seq_plan_import(
            self._engine,
            seq,
            data,
            len(state.engine_state),
            ffi.cast("int32_t *", layout.ctypes.data),
            layout.size,
        )
        if m == lib.TOVA_ERR_CAPACITY:
            raise CapacityError(self._error())
        if m < 0:
            raise StateError(self._error())
        blob, _ = place_layout(state.llama_state, parsed, layout[:m])
        buf = (ctypes.c_uint8 * len(blob)).from_buffer_copy(blob)
        if llama_cpp.llama_state_seq_set_data(self._ctx, buf, len(blob), seq) != len(blob):
            raise StateError("llama.cpp refused the sequence state")
        rc = lib.tova_engine_seq_import_state(
            self._engine, ffi.cast("void *", self._ctx), seq, data, len(data)
        )
        if rc != 0:
            raise StateError(self._error())
        if len(state.scores):
            self._last[seq] = np.array(state.scores[0], dtype=np.float32)

    @_exclusive
    def save(self, seq: int, path: str | os.PathLike) -> int:
        """Write one sequence's conversation to `path` (atomically; tova_cpp/state.py has the format); returns
        the bytes written. Park a sequence: save(seq, path), then remove(seq)."""
        from .state import write_file

        return write_file(path, self.save_state(seq))

    @_exclusive
    def load(self, seq: int | None, path: str | os.PathLike) -> int:
        """load_state from a file written by save (or Session.save); returns the sequence id."""
        from .state import read_file

        return self.load_state(seq, read_file(path))

    # text helpers: Session's own, which read only the model's vocabulary
    tokenize = Session.tokenize
    detokenize = Session.detokenize
    chat_prompt = Session.chat_prompt
    is_eog = Session.is_eog
    _require_tokenizer = Session._require_tokenizer
    kv_row_bytes = Session.kv_row_bytes
    _kv_row_bytes = Session._kv_row_bytes
    _set_threads = Session._set_threads
    set_force_graph_mover = Session.set_force_graph_mover

    @_exclusive(require_open=False)
    def close(self) -> None:
        """Free the context, engine and model; closing twice is fine."""
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._engine:
            lib.tova_engine_free(self._engine)
            self._engine = None
        if self._model:
            release_model(self._model)
            self._model = None
        self._seqs = {}
        self._last = {}

    def __enter__(self) -> BatchSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_lock", None) is not None:
            self.close()


# -- batched generation --------------------------------------------------------------------------------------

_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")], align=True)
_buffers = threading.local()  # one llama_token_data array per thread that samples, reused for every token


def _token_data(n: int) -> tuple[np.ndarray, ctypes._Pointer, np.ndarray]:
    """This thread's (token data, its llama_token_data view, the ids 0..n-1) for a vocabulary of n tokens."""
    held = getattr(_buffers, "held", None)
    if held is None or held[0].size != n:
        data = np.zeros(n, dtype=_TOKEN_DATA)
        held = _buffers.held = (
            data,
            data.ctypes.data_as(llama_cpp.llama_token_data_p),
            np.arange(n, dtype=np.int32),
        )
    return held


def sample_logits(sampler, logits: np.ndarray) -> int:
    """llama_sampler_sample on an array of logits instead of a context's output row: apply the chain, take
    its selection, accept it (penalties and grammar see the token).

    A greedy chain (Sampler.greedy: temperature 0, no logit bias, grammar or active penalties) picks the first
    largest logit, as llama.cpp's greedy sampler does, with np.argmax instead of a pass over a token-data array
    (logits with a NaN go through the chain: there the two disagree). Any other chain runs on this thread's
    token-data array, refilled with every id, logit and p = 0 per call since the chain reorders and shrinks it."""
    if getattr(sampler, "greedy", False) and logits.dtype == np.float32:
        tok = int(np.argmax(logits))
        if logits[tok] == logits[tok]:  # not NaN: where NaNs are, np.argmax and llama.cpp disagree
            llama_cpp.llama_sampler_accept(sampler.chain, tok)
            return tok
    data, ptr, ids = _token_data(logits.size)
    data["id"] = ids
    data["logit"] = logits
    data["p"] = 0.0
    arr = llama_cpp.llama_token_data_array(data=ptr, size=logits.size, selected=-1, sorted=False)
    llama_cpp.llama_sampler_apply(sampler.chain, ctypes.byref(arr))
    if not 0 <= arr.selected < arr.size:
        raise RuntimeError("the sampler chain selected no token")
    tok = int(arr.data[arr.selected].id)
    llama_cpp.llama_sampler_accept(sampler.chain, tok)
    return tok


@dataclass
class BatchResponse:
    """One generated token of prompt `index` (GenerationResponse's fields that make sense per sequence).
    text: new text (held back while a stop string may start); finish_reason: None, "stop" or "length"."""

    index: int
    text: str
    token: int
    logprob: float
    generation_tokens: int
    finish_reason: str | None = None


def stream_generate_batch(
    bs: BatchSession,
    prompts: Sequence[str | Sequence[int]],
    *,
    max_tokens: int | None = 256,
    stop: str | Sequence[str] | None = None,
    seed: int | None = None,
    budget: int | None = None,
    **sampling,
) -> Iterator[BatchResponse]:
    """Generate from every prompt (text, tokenized with BOS and special tokens, or token ids), as many at once as
    the session holds: each step decodes every running sequence's next token and the prompts of newly admitted
    ones in one batched call; a finished sequence is removed and the next queued prompt admitted. Yields
    BatchResponse records as tokens arrive (interleaved across prompts); each prompt's last record carries its
    finish_reason. Sampling keywords are Llama's (tova_cpp.generate.Sampler); with a seed, prompt i samples
    with seed + i, so results do not depend on how prompts were grouped."""
    max_tokens = check_max_tokens(max_tokens)
    stops = check_stops(stop)
    # a model without a tokenizer generates token ids only (llama.cpp aborts rendering their text)
    has_text = llama_cpp.llama_vocab_type(bs._vocab) != llama_cpp.LLAMA_VOCAB_TYPE_NONE
    if stops and not has_text:
        bs._require_tokenizer()
    todo = []
    for p in prompts:
        toks = bs.tokenize(p, add_special=True, parse_special=True) if isinstance(p, str) else list(p)
        if not toks:
            raise ValueError("a prompt is empty")
        todo.append(toks)
    queue = list(range(len(todo)))
    running: dict[int, dict] = {}  # seq id -> its generation state
    try:
        while queue or running:
            while queue and bs.can_add(budget):
                i = queue.pop(0)
                seq = bs.add(budget=budget)
                running[seq] = {
                    "index": i,
                    "feed": todo[i],
                    "sampler": Sampler(bs, seed=None if seed is None else seed + i, **sampling),
                    "decoder": codecs.getincrementaldecoder("utf-8")(errors="replace"),
                    "text": "",
                    "emitted": 0,
                    "n": 0,
                }
            if not running:
                raise CapacityError("a prompt's sequence does not fit in an empty session (lower its budget)")
            logits = bs.step({seq: st["feed"] for seq, st in running.items()})
            for seq, lg in logits.items():
                st = running[seq]
                if not np.isfinite(lg).all():
                    raise EngineError(f"prompt {st['index']}: the model produced non-finite logits")
                tok = sample_logits(st["sampler"], lg)
                logprob = float(lg[tok]) - log_normalizer(lg)
                reason, text = None, ""
                if bs.is_eog(tok):
                    reason = "stop"
                    text = st["text"][st["emitted"] :]
                else:
                    st["n"] += 1
                    if has_text:
                        st["text"] += st["decoder"].decode(token_piece(bs._vocab, tok))
                    hit = min((j for j in (st["text"].find(x) for x in stops) if j >= 0), default=-1)
                    if hit >= 0:
                        reason, text = "stop", st["text"][st["emitted"] : hit]
                    elif max_tokens is not None and st["n"] >= max_tokens:
                        st["text"] += st["decoder"].decode(b"", final=True)
                        reason, text = "length", st["text"][st["emitted"] :]
                    else:
                        upto = len(st["text"]) - _stop_hold(st["text"], stops)
                        text, st["emitted"] = st["text"][st["emitted"] : upto], max(st["emitted"], upto)
                yield BatchResponse(st["index"], text, tok, logprob, st["n"], reason)
                if reason is not None:
                    st["sampler"].close()
                    bs.remove(seq)
                    del running[seq]
                else:
                    st["feed"] = [tok]
    finally:
        for seq, st in running.items():
            st["sampler"].close()
            if bs._ctx and seq in bs._seqs:
                bs.remove(seq)


def generate_batch(bs: BatchSession, prompts: Sequence[str | Sequence[int]], **kwargs) -> list[str]:
    """The whole generated text of every prompt, in prompt order (stream_generate_batch's keywords)."""
    out = [""] * len(prompts)
    for r in stream_generate_batch(bs, prompts, **kwargs):
        out[r.index] += r.text
    return out


def aggregate_decode_rate(
    bs: BatchSession, n_seqs: int, prompt_len: int, n_steps: int
) -> tuple[float, float]:
    """Decode tokens/s of n_seqs sequences stepping together (after a prompt of prompt_len random tokens each):
    (aggregate tokens/s, seconds per step). For benchmarks; adds and removes its own sequences."""
    rng = np.random.default_rng(0)
    seqs = [bs.add() for _ in range(n_seqs)]
    try:
        bs.step({s: rng.integers(0, bs.n_vocab, prompt_len).tolist() for s in seqs})
        nxt = {s: [int(rng.integers(0, bs.n_vocab))] for s in seqs}
        bs.step(nxt)  # warm-up
        t0 = time.perf_counter()
        for _ in range(n_steps):
            bs.step(nxt)
        dt = time.perf_counter() - t0
    finally:
        for s in seqs:
            bs.remove(s)
    return n_seqs * n_steps / dt, dt / n_steps
