"""The step the engine owns (tova_engine_decode): progress and cancellation leave a consistent session, errors
at the C boundary are codes with messages, the cffi declarations come from tova.h and a stale engine is
refused. On the tiny random model (no download)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from tiny_gguf import write_tiny_llama

import tova_cpp._ffi as ffi_mod
from tova_cpp import Session
from tova_cpp._ffi import ffi, lib
from tova_cpp.errors import Cancelled, EngineError


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-step") / "tiny.gguf"
    write_tiny_llama(path)
    return path


def consistent(s: Session) -> None:
    """n_past, the engine's cells and llama.cpp's metadata window agree."""
    lo, hi = s.pos_window()
    if s.n_occupied == 0:
        assert (lo, hi) == (-1, -1)
        return
    assert (lo, hi) == (s.n_past - s.n_occupied, s.n_past - 1)
    for row in s.kept_positions():
        kept = row[row >= 0]
        assert np.unique(kept).size == kept.size and kept.max() <= s.n_past - 1


def test_progress_is_called_after_each_ubatch(tiny_path):
    calls = []
    with Session(tiny_path, budget=8, chunk=4, n_threads=2) as s:
        s.eval(list(range(3, 33)), progress=lambda done, total: calls.append((done, total)))
        assert calls[-1] == (30, 30)
        assert [d for d, _ in calls] == sorted({d for d, _ in calls})  # strictly increasing
        assert all(b - a <= 4 for (a, _), (b, _) in zip([(0, 0), *calls], calls, strict=False))
        consistent(s)


@pytest.mark.parametrize("policy", ["tova", "window", "full"])
@pytest.mark.parametrize("stop_after", [1, 3, 4])
def test_cancel_keeps_what_was_evaluated(tiny_path, policy, stop_after):
    n = 20 if policy != "full" else 10
    with Session(tiny_path, budget=8, chunk=2, policy=policy, n_threads=2) as s:
        seen = []

        def progress(done, total):
            seen.append(done)
            return len(seen) < stop_after

        with pytest.raises(Cancelled):
            s.eval(list(range(3, 3 + n)), progress=progress)
        assert s.n_past == seen[-1] < n
        consistent(s)
        before = s.n_past
        s.eval([7, 8])  # the session goes on from where it stopped
        assert s.n_past == before + 2
        consistent(s)


def test_cancelled_session_continues_like_an_uncancelled_one(tiny_path):
    """Stopping between ubatches and evaluating the rest gives the same cache as one eval of everything, when
    the stop falls on a piece boundary (a cut boundary): the per-layer sets and the logits agree."""
    toks = list(range(3, 27))
    with Session(tiny_path, budget=8, chunk=4, type_k="f32", type_v="f32", n_threads=2) as a:
        a.eval(toks)
        want = (a.kept_positions(), a.logits())
    with Session(tiny_path, budget=8, chunk=4, type_k="f32", type_v="f32", n_threads=2) as b:
        # memory 12: the first piece is 12 tokens (3 ubatches of 4), then pieces of 4
        with pytest.raises(Cancelled):
            b.eval(toks, progress=lambda done, total: done < 12)
        assert b.n_past == 12
        b.eval(toks[12:])
        np.testing.assert_array_equal(b.kept_positions(), want[0])
        np.testing.assert_allclose(b.logits(), want[1], rtol=1e-5, atol=1e-5)


def test_exception_in_progress_propagates_and_leaves_the_session_consistent(tiny_path):
    with Session(tiny_path, budget=8, chunk=2, n_threads=2) as s:

        def progress(done, total):
            if done >= 4:
                raise KeyboardInterrupt
            return None  # None continues

        with pytest.raises(KeyboardInterrupt):
            s.eval(list(range(3, 23)), progress=progress)
        assert s.n_past == 4
        consistent(s)
        s.eval([5])
        assert s.n_past == 5


def test_stop_after_the_last_ubatch_completes_the_eval(tiny_path):
    with Session(tiny_path, budget=8, chunk=4, n_threads=2) as s:
        s.eval(list(range(3, 7)), progress=lambda done, total: False)  # one ubatch: nothing left to stop
        assert s.n_past == 4
        consistent(s)


def test_logits_all_with_progress(tiny_path):
    with Session(tiny_path, budget=8, chunk=4, n_threads=2) as s:
        rows = s.eval(list(range(3, 20)), logits_all=True, progress=lambda d, t: True)
        assert rows.shape == (17, s.n_vocab) and np.isfinite(rows).all()
        np.testing.assert_array_equal(rows[-1], s.logits())


def test_decode_argument_errors_change_nothing(tiny_path):
    with Session(tiny_path, budget=8, chunk=4, n_threads=2) as s:
        s.eval([1, 2, 3])
        done = ffi.new("int32_t *")
        ctx = ffi.cast("void *", s._ctx)
        toks = ffi.new("int32_t[]", [1, 2])
        assert lib.tova_engine_decode(ffi.NULL, ctx, toks, 2, 3, ffi.NULL, ffi.NULL, ffi.NULL, done) == -1
        assert (
            lib.tova_engine_decode(s._engine, ffi.NULL, toks, 2, 3, ffi.NULL, ffi.NULL, ffi.NULL, done) == -1
        )
        assert (
            lib.tova_engine_decode(s._engine, ctx, ffi.NULL, 2, 3, ffi.NULL, ffi.NULL, ffi.NULL, done) == -1
        )
        assert lib.tova_engine_decode(s._engine, ctx, toks, 0, 3, ffi.NULL, ffi.NULL, ffi.NULL, done) == -1
        bad = ffi.new("int32_t[]", [1, s.n_vocab])
        assert lib.tova_engine_decode(s._engine, ctx, bad, 2, 3, ffi.NULL, ffi.NULL, ffi.NULL, done) == -1
        assert "token ids" in ffi.string(lib.tova_engine_last_error(s._engine)).decode()
        assert s.n_past == 3 and s.n_occupied == 3
        consistent(s)


def test_full_policy_overflow_is_refused_before_any_decode(tiny_path):
    with Session(tiny_path, budget=8, chunk=4, policy="full", n_threads=2) as s:
        s.eval(list(range(3, 13)))
        with pytest.raises(ValueError, match="holds every token"):
            s.eval(list(range(3, 6)))
        assert s.n_past == 10
        consistent(s)


def test_engine_failure_mid_step_resets_the_session(tiny_path, monkeypatch):
    with Session(tiny_path, budget=8, chunk=4, n_threads=2) as s:
        s.eval([1, 2, 3])
        # make the engine's view of the context wrong behind its back: llama.cpp loses the cache
        import llama_cpp

        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(s._ctx), True)
        # llama.cpp accepts any start position on an empty cache, but puts the token in another cell than
        # the engine's mirror of its slot search: caught, and both are cleared
        with pytest.raises(EngineError, match="reset"):
            for t in range(20):
                s.eval([t + 3])
        assert s.n_past == 0 and s.n_occupied == 0 and s.pos_window() == (-1, -1)
        s.eval([1, 2])
        assert s.n_past == 2
        consistent(s)


@pytest.mark.parametrize(
    "args",
    [
        (1, 32, 10**9, 10**9, True),  # budget 10**9: refused before allocating
        (1, 10**6, 512, 1024, True),  # n_layer x n_cells too large
        (1, 0, 8, 16, True),
        (1, 4, 8, 4, True),  # memory < budget
        (7, 4, 8, 16, True),  # unknown policy
        (4, 4, 8, 16, False),  # h2o with flash attention
    ],
)
def test_create_refuses_bad_sizes_with_a_message(args):
    err = ffi.new("char[]", 256)
    assert lib.tova_engine_create(*args, err, 256) == ffi.NULL
    assert ffi.string(err).decode()


def test_null_handles_are_errors_not_crashes():
    assert lib.tova_engine_set_keep(ffi.NULL, 1) == -1
    assert lib.tova_engine_set_cells(ffi.NULL, 16) == -1
    assert lib.tova_engine_set_evict_interval(ffi.NULL, 1) == -1
    assert lib.tova_engine_n_occupied(ffi.NULL) == -1
    assert lib.tova_engine_stats(ffi.NULL, ffi.new("double[5]"), 5, False) == -1
    assert ffi.string(lib.tova_engine_cache_buffer(ffi.NULL)) == b""
    lib.tova_engine_reset(ffi.NULL)
    lib.tova_engine_free(ffi.NULL)
    assert lib.tova_policy_evict(ffi.NULL, ffi.NULL, 3, 1, ffi.NULL) == -1


def test_cdef_is_the_header_and_the_engine_was_built_from_it():
    header = ffi_mod._header_path(ffi_mod._engine_path())
    text = header.read_bytes()
    assert ffi.string(lib.tova_abi_hash()).decode() == hashlib.sha256(text).hexdigest()
    cdef = ffi_mod.cdef_from_header(text.decode())
    assert not any(line.lstrip().startswith("#") for line in cdef.splitlines())
    assert 'extern "C" {' not in cdef
    assert "tova_engine_decode" in cdef and lib.TOVA_CANCELLED == 1


def test_stale_engine_is_refused(monkeypatch, tmp_path):
    other = tmp_path / "tova.h"
    other.write_bytes(ffi_mod._header_path(ffi_mod._engine_path()).read_bytes() + b"\n// changed\n")
    monkeypatch.setattr(ffi_mod, "_header_path", lambda engine: other)
    with pytest.raises(ffi_mod.TovaVersionError, match="rebuild"):
        ffi_mod._load()


def test_bench_speed_plain_row_and_gpu_flags(tiny_path, tmp_path, capsys):
    """`tova bench speed --plain` adds llama-cpp-python's own Llama.eval; the flags reach every Session row."""
    from tova_cpp.bench import main

    argv = [
        "speed",
        "-m",
        str(tiny_path),
        "--plain",
        "-d",
        "32",
        "--budgets",
        "16",
        "--policies",
        "tova,full",
    ]
    argv += [
        "-n",
        "2",
        "-r",
        "1",
        "--chunk",
        "8",
        "-t",
        "1",
        "-o",
        str(tmp_path),
        "--in-process",
        "--no-plot",
    ]
    argv += ["-ngl", "0", "-fa", "1", "-ctk", "f32", "-ctv", "f32", "--evict-interval", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| backend | threads | policy | budget | test | t/s | ngl | fa | type_k | type_v | m |" in out
    assert "| CPU | 1 | plain | all | tg2 @ d32 |" in out
    assert "| CPU | 1 | tova | 16 | tg2 @ d32 |" in out and "| 0 | 1 | f32 | f32 | 2 |" in out
    assert "full / plain tokens/s at d32" in out
