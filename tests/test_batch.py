"""Many sequences in one context (tova_cpp.batch): each sequence of a batch of 4 (different prompt lengths,
budgets, keep, evict_interval and start times, one removed midway, one added into the freed cells) keeps exactly
the per-layer sets of the NumPy oracle run alone, and of a Session run alone, at every step; logits within the
tolerance measured here. Then the errors: capacity refusal, unknown and removed ids, closed session, bad input.
On the tiny random model (no download); F32 cache so the argmin is never a rounding tie."""

from __future__ import annotations

import os
import threading
import warnings

import numpy as np
import pytest
from reference import Reference
from tiny_gguf import write_tiny_llama

from tova_cpp import Session
from tova_cpp.batch import BatchSession, generate_batch, stream_generate_batch
from tova_cpp.errors import (
    CapacityError,
    EngineError,
    SessionBusyError,
    SessionClosedError,
    UnknownSequenceError,
)

CHUNK = 8
# batch vs the same sequence alone (Session), relative to the largest logit, measured on CPU with an F32 cache:
# see docs/BATCH.md (other ubatch shapes change ggml's summation order; flash attention casts K/V to F16 and
# its kernel tiles by batch). Against the oracle: test_reference's tolerances.
RTOL_ALONE = {False: 1e-5, True: 2e-2}
RTOL_REF = {False: 1e-4, True: 2e-2}

# (name, prompt length, settings, step it starts at, step it is removed at or None)
PLAN = [
    ("a", 10, {"budget": 16}, 0, None),  # prompt < budget
    ("b", 30, {"budget": 12}, 0, 14),  # prompt > memory (chunked); removed midway
    ("c", 50, {"budget": 16, "evict_interval": 3}, 5, None),  # long prompt, cut every 3 steps
    ("d", 5, {"budget": 8, "keep": 2}, 12, None),  # starts late, protected prefix
    ("e", 20, {"budget": 10}, 15, None),  # takes the cells b freed
]
STEPS = 40
# the same plan with every prompt within its sequence's memory (one piece, at most one cut per step): on a GPU a
# near tie may flip a cut, and the oracle can follow only the last cut of a step (tests/test_gpu.py)
PLAN_ONE_PIECE = [
    (n, min(p, kw["budget"] + max(CHUNK, kw.get("evict_interval", 1))), kw, a, b) for n, p, kw, a, b in PLAN
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-batch") / "tiny.gguf"
    return path, write_tiny_llama(path)


def run_batch(
    path, policy, flash_attn, n_vocab, n_ctx=None, plan=PLAN, logits_at=None, device_paths=False, **kw
):
    """Runs PLAN in one BatchSession; returns per name: the token stream, and per step (kept, logits).
    logits_at(step) False: that step runs with logits=False (its logits entry is None). device_paths: the
    engine takes its device code paths on the CPU's cache (set_force_graph_mover)."""
    kw = {"type_k": "f32", "type_v": "f32", "n_threads": 2, **kw}
    rng = np.random.default_rng(7)
    streams = {name: rng.integers(0, n_vocab, size=n + STEPS).tolist() for name, n, *_ in plan}
    got = {name: [] for name, *_ in plan}
    with BatchSession(
        path,
        n_seq_max=4,
        n_ctx=n_ctx,
        budget=16,
        chunk=CHUNK,
        policy=policy,
        flash_attn=flash_attn,
        **kw,
    ) as bs:
        bs.set_force_graph_mover(device_paths)
        ids, fed = {}, {}
        for t in range(STEPS):
            for name, *_, stop in plan:
                if stop == t:
                    bs.remove(ids.pop(name))
            batch = {}
            for name, n, kw, start, _ in plan:
                if start == t:
                    ids[name] = bs.add(**kw)
                    batch[ids[name]] = streams[name][:n]
                    fed[name] = n
                elif name in ids:
                    batch[ids[name]] = [streams[name][fed[name]]]
                    fed[name] += 1
            want = logits_at is None or logits_at(t)
            out = bs.step(batch, logits=want)
            if not want:
                assert out == {}
                for seq in batch:
                    with pytest.raises(RuntimeError, match="logits=False"):
                        bs.logits(seq)
                out = dict.fromkeys(batch)
            if not bs.kv_unified:
                assert_in_own_stream(bs)
            for name, seq in ids.items():
                assert bs.n_past(seq) == fed[name]
                lo, hi = bs.pos_window(seq)
                assert (lo, hi) == (fed[name] - bs.n_occupied(seq), fed[name] - 1)
                got[name].append((bs.kept_positions(seq), out[seq]))
        assert sorted(ids.values()) == bs.sequences
    return streams, got


def assert_in_own_stream(bs):
    """Per-sequence streams: every occupied cell lies in its own sequence's stream."""
    from tova_cpp._ffi import ffi, lib

    owner = np.empty(bs.n_cells, dtype=np.int32)
    assert lib.tova_engine_cell_seqs(bs._engine, ffi.cast("int32_t *", owner.ctypes.data), owner.size) == 0
    assert bs.n_cells == bs.n_seq_max * bs.stream_cells
    occupied = np.flatnonzero(owner >= 0)
    assert occupied.size and np.array_equal(owner[occupied], occupied // bs.stream_cells)


def replay_against_reference(model, name, streams, got, policy, rtol, max_ties=0, tie_rtol=5e-2, plan=PLAN):
    """The oracle run alone on sequence `name`'s tokens, compared with what the batch recorded at every step
    (test_reference.first_mismatch's rule: up to max_ties near-tie cuts may differ, the oracle follows).
    Returns None or the first mismatch."""
    _, n, kw, start, stop = next(p for p in plan if p[0] == name)
    ref = Reference(
        model, kw["budget"], CHUNK, policy, keep=kw.get("keep", 0), evict_interval=kw.get("evict_interval", 1)
    )
    ties = 0
    for i, (kept, logits) in enumerate(got[name]):
        ref.eval(streams[name][:n] if i == 0 else [streams[name][n + i - 1]])
        want = ref.kept_positions()
        if kept.shape != want.shape or not np.array_equal(kept, want):
            if max_ties == 0 or ref.before_cut is None:
                return f"{name} step {i}: kept positions differ"
            try:
                ties += ref.follow(kept, rtol=tie_rtol)
            except AssertionError as e:
                return f"{name} step {i}: kept positions differ ({e})"
            if ties > max_ties:
                return f"{name} step {i}: more than {max_ties} near-tie cuts differ"
        tol = rtol * np.abs(ref.last_logits).max()
        if not np.allclose(logits, ref.last_logits, rtol=rtol, atol=tol):
            return f"{name} step {i}: logits differ by {np.abs(logits - ref.last_logits).max()}"
    return None


def alone(path, model, name, streams, policy, flash_attn):
    """The same sequence alone: per step (kept, logits) from Session and from the oracle."""
    _, n, kw, start, stop = next(p for p in PLAN if p[0] == name)
    n_steps = (stop if stop is not None else STEPS) - start
    tokens = streams[name]
    ref = Reference(
        model,
        kw["budget"],
        CHUNK,
        policy,
        keep=kw.get("keep", 0),
        evict_interval=kw.get("evict_interval", 1),
    )
    out = []
    with Session(
        path,
        budget=kw["budget"],
        keep=kw.get("keep", 0),
        evict_interval=kw.get("evict_interval", 1),
        chunk=CHUNK,
        policy=policy,
        flash_attn=flash_attn,
        type_k="f32",
        type_v="f32",
        n_threads=2,
    ) as s:
        for i in range(n_steps):
            toks = tokens[:n] if i == 0 else [tokens[n + i - 1]]
            s.eval(toks)
            ref.eval(toks)
            out.append((s.kept_positions(), s.logits(), ref.kept_positions(), ref.last_logits))
    return out


@pytest.mark.parametrize("kv_unified", [True, False], ids=["unified", "streams"])
@pytest.mark.parametrize(
    "policy,flash_attn", [("tova", False), ("tova", True), ("h2o", False), ("window", False), ("sink", False)]
)
def test_each_sequence_matches_itself_alone_and_the_oracle(tiny, policy, flash_attn, kv_unified):
    path, model = tiny
    streams, got = run_batch(path, policy, flash_attn, model.n_vocab, kv_unified=kv_unified)
    worst = 0.0
    for name, *_ in PLAN:
        want = alone(path, model, name, streams, policy, flash_attn)
        assert len(want) == len(got[name])
        for step, ((kept, logits), (s_kept, s_logits, r_kept, r_logits)) in enumerate(
            zip(got[name], want, strict=True)
        ):
            assert np.array_equal(kept, s_kept), (
                f"{name} step {step}: kept sets differ from the sequence alone"
            )
            scale = np.abs(s_logits).max()
            worst = max(worst, float(np.abs(logits - s_logits).max() / scale))
            rtol = RTOL_ALONE[flash_attn]
            assert np.allclose(logits, s_logits, rtol=rtol, atol=rtol * scale), f"{name} step {step}"
            if (
                not flash_attn
            ):  # flash attention near ties: test_reference follows them; here Session is the judge
                assert np.array_equal(kept, r_kept), f"{name} step {step}: kept sets differ from the oracle"
            tol = RTOL_REF[flash_attn] * np.abs(r_logits).max()
            assert np.allclose(logits, r_logits, rtol=RTOL_REF[flash_attn], atol=tol), f"{name} step {step}"
    mode = "unified" if kv_unified else "streams"
    print(f"\n{policy} fa={flash_attn} {mode}: worst |batch - alone| / max|logit| = {worst:.2e}")


@pytest.mark.parametrize("kv_unified", [True, False], ids=["unified", "streams"])
@pytest.mark.parametrize("policy", ["tova", "h2o"])
def test_device_attention_sums_match_the_oracle(tiny, policy, kv_unified):
    """The path a GPU cache takes with flash attention off, forced on the CPU: the attention sums formed by a
    ggml graph where the softmax lies (tova: the head sums of each sequence's scored row; h2o: every row's column
    sums, per stream) keep the oracle's sets at every step of the plan, pieces split across ubatches included."""
    path, model = tiny
    streams, got = run_batch(path, policy, False, model.n_vocab, kv_unified=kv_unified, device_paths=True)
    for name, *_ in PLAN:
        assert replay_against_reference(model, name, streams, got, policy, RTOL_REF[False]) is None


@pytest.mark.parametrize("kv_unified", [True, False], ids=["unified", "streams"])
@pytest.mark.parametrize("flash_attn", [False, True], ids=["fa-off", "fa-on"])
def test_step_without_logits_changes_nothing_else(tiny, flash_attn, kv_unified):
    """logits=False only skips the copy: every step's kept sets, and the logits of the steps that ask for them,
    are bit-identical to a run that copies the logits at every step."""
    path, model = tiny
    kw = {"kv_unified": kv_unified}
    _, every = run_batch(path, "tova", flash_attn, model.n_vocab, **kw)
    _, some = run_batch(path, "tova", flash_attn, model.n_vocab, logits_at=lambda t: t % 3 == 2, **kw)
    for name, steps in every.items():
        assert len(steps) == len(some[name])
        for t, ((kept, logits), (kept2, logits2)) in enumerate(zip(steps, some[name], strict=True)):
            np.testing.assert_array_equal(kept, kept2, err_msg=f"{name} step {t}")
            if logits2 is not None:
                np.testing.assert_array_equal(logits, logits2, err_msg=f"{name} step {t}")


def test_decode_batch_accepts_null_logits_and_stats_sizes(tiny):
    """The C API: tova_engine_decode_batch with logits NULL decodes (the next step's logits equal a run that
    copied them); tova_engine_stats takes 1..TOVA_STAT_COUNT counters; bad step arguments stay typed errors."""
    path, _ = tiny
    from tova_cpp._ffi import ffi, lib

    kw = dict(n_seq_max=2, budget=8, chunk=4, type_k="f32", type_v="f32", n_threads=2)
    with BatchSession(path, **kw) as bs, BatchSession(path, **kw) as ref:
        a, b = bs.add(), bs.add()
        ra, rb = ref.add(), ref.add()
        seqs, counts = ffi.new("int32_t[]", [a, b]), ffi.new("int32_t[]", [3, 2])
        toks = ffi.new("int32_t[]", [3, 4, 5, 6, 7])
        ctx = ffi.cast("void *", bs._ctx)
        assert lib.tova_engine_decode_batch(bs._engine, ctx, seqs, counts, 2, toks, ffi.NULL) == 0
        ref.step({ra: [3, 4, 5], rb: [6, 7]})
        assert (bs.n_past(a), bs.n_past(b)) == (3, 2)
        bs.engine_stats(reset=True)  # the direct C call above counts in the engine's step_s, not in call_s
        for t in range(12):  # past the budget: cuts with and without the copy
            got = bs.step({a: [8 + t], b: [9 + t]}, logits=t % 2 == 1)
            want = ref.step({ra: [8 + t], rb: [9 + t]})
            np.testing.assert_array_equal(bs.kept_positions(a), ref.kept_positions(ra))
            if t % 2:
                np.testing.assert_array_equal(got[a], want[ra])
                np.testing.assert_array_equal(bs.logits(b), want[rb])
            else:
                assert got == {}
        stats = bs.engine_stats()
        assert stats["steps"] == 12 and stats["decodes"] >= 12 and stats["cuts"] >= 1
        assert stats["step_s"] >= stats["decode_s"] > 0 and stats["call_s"] >= stats["step_s"]
        assert stats["cut_s"] >= stats["choose_s"] >= 0
        out = ffi.new("double[]", lib.TOVA_STAT_COUNT + 1)
        assert lib.tova_engine_stats(bs._engine, out, 5, False) == 0  # Session reads the first five
        assert lib.tova_engine_stats(bs._engine, out, 0, False) == lib.TOVA_ERR_ARG
        assert lib.tova_engine_stats(bs._engine, out, lib.TOVA_STAT_COUNT + 1, False) == lib.TOVA_ERR_ARG
        bs.engine_stats(reset=True)
        assert bs.engine_stats()["steps"] == 0 and bs.engine_stats()["step_s"] == 0
        n_past = bs.n_past(a)
        for bad in ("yes", 1, None):
            with pytest.raises(ValueError, match="logits must be True or False"):
                bs.step({a: [3]}, logits=bad)
        assert bs.n_past(a) == n_past


@pytest.mark.parametrize("n_ubatch", [64, 8], ids=["whole-pieces", "split-pieces"])
@pytest.mark.parametrize("flash_attn", [False, True], ids=["fa-off", "fa-on"])
def test_streams_prompts_together_match_alone(tiny, flash_attn, n_ubatch):
    """Per-sequence streams: three prompts of consecutive ids go through the same ubatches (several tokens of
    each stream per ubatch, a scored row per stream, all cut after the same decodes), then decode together; each
    keeps what it keeps alone and gives its logits alone."""
    path, model = tiny
    rng = np.random.default_rng(11)
    prompts = [rng.integers(0, model.n_vocab, size=n).tolist() for n in (45, 45, 60)]
    kw = dict(budget=12, chunk=CHUNK, type_k="f32", type_v="f32", n_threads=2, flash_attn=flash_attn)
    nxt = rng.integers(0, model.n_vocab, size=(6, len(prompts))).tolist()
    with BatchSession(path, n_seq_max=3, kv_unified=False, n_ubatch=n_ubatch, **kw) as bs:
        ids = [bs.add() for _ in prompts]
        got = []
        for batch in [dict(zip(ids, prompts, strict=True))] + [
            {s: [t] for s, t in zip(ids, row, strict=True)} for row in nxt
        ]:
            out = bs.step(batch)
            assert_in_own_stream(bs)
            got.append({s: (bs.kept_positions(s), out[s]) for s in ids})
    rtol = RTOL_ALONE[flash_attn]
    for j, (p, s) in enumerate(zip(prompts, ids, strict=True)):
        with Session(path, **kw) as alone:
            for step, toks in enumerate([p] + [[row[j]] for row in nxt]):
                alone.eval(toks)
                kept, logits = got[step][s]
                assert np.array_equal(alone.kept_positions(), kept), f"sequence {s} step {step}: kept sets"
                want = alone.logits()
                scale = np.abs(want).max()
                assert np.allclose(logits, want, rtol=rtol, atol=rtol * scale), f"sequence {s} step {step}"


def test_cells_rule_and_capacity(tiny):
    path, _ = tiny
    # unified: memory per sequence = budget + max(chunk, evict_interval) = 16 + 8 = 24; 72 cells pad to 256
    with BatchSession(path, n_seq_max=3, budget=16, chunk=8, n_threads=2, kv_unified=True) as bs:
        assert bs.n_cells == 256  # 3 * 24 = 72, padded to a multiple of 256
        assert bs.memory_of(16, 1) == 24 and bs.memory_of(16, 20) == 36
        ids = [bs.add(), bs.add(), bs.add()]
        assert ids == [0, 1, 2] and bs.sequences == [0, 1, 2]
        assert not bs.can_add()
        with pytest.raises(CapacityError, match="n_seq_max"):
            bs.add()
        bs.remove(1)
        assert bs.can_add() and bs.add() == 1
    with BatchSession(path, n_seq_max=8, n_ctx=256, budget=100, chunk=8, n_threads=2, kv_unified=True) as bs:
        assert bs.add() == 0 and bs.add() == 1  # 2 x 108 = 216 of 256 cells
        assert not bs.can_add() and bs.can_add(budget=32)
        with pytest.raises(CapacityError, match="does not fit"):
            bs.add()
        assert bs.sequences == [0, 1]  # nothing changed
        assert bs.add(budget=32) == 2
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        BatchSession(path, n_seq_max=2, n_ctx=10, budget=16, chunk=8, kv_unified=True)


def test_cells_rule_streams(tiny):
    """Per-sequence streams: llama.cpp gives each sequence id a stream of PAD256(n_ctx / n_seq_max) cells; a
    sequence fits when its memory fits its stream, whatever the others hold."""
    path, _ = tiny
    with BatchSession(path, n_seq_max=3, budget=16, chunk=8, n_threads=2, kv_unified=False) as bs:
        assert (bs.stream_cells, bs.n_cells) == (256, 768)  # 24 cells of memory round up to a 256-cell stream
        assert bs.can_add(budget=248) and not bs.can_add(budget=249)  # 248 + 8 = 256
        with pytest.raises(CapacityError, match="does not fit in its stream of 256 cells"):
            bs.add(budget=249)
        ids = [bs.add(budget=248), bs.add(), bs.add()]
        assert ids == [0, 1, 2] and not bs.can_add()
        with pytest.raises(CapacityError, match="n_seq_max"):
            bs.add()
        bs.step({s: list(range(3, 40)) for s in ids})
        assert_in_own_stream(bs)
        bs.remove(1)
        assert bs.can_add(budget=248) and bs.add() == 1
        bs.step({1: [5, 6, 7], 0: [8]})
        assert_in_own_stream(bs)
    with BatchSession(path, n_seq_max=2, n_ctx=600, budget=16, chunk=8, n_threads=2, kv_unified=False) as bs:
        assert (bs.stream_cells, bs.n_cells) == (512, 1024)  # 600 / 2 = 300, rounded up to 512 per stream
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        BatchSession(path, n_seq_max=4, n_ctx=1024, budget=300, chunk=8, kv_unified=False)


def test_engine_refuses_a_context_of_the_other_layout(tiny):
    """The engine checks the context's KV layout (streams = llama_n_ctx / llama_n_ctx_seq) before any decode."""
    path, _ = tiny
    from tova_cpp._ffi import lib

    with BatchSession(path, n_seq_max=2, budget=8, chunk=4, n_threads=2, kv_unified=True) as bs:
        a = bs.add()
        assert lib.tova_engine_set_streams(bs._engine, True) == 0
        assert lib.tova_engine_set_cells(bs._engine, bs.n_cells) == 0
        with pytest.raises(ValueError, match=r"1 stream\(s\) but the engine expects 2"):
            bs.eval(a, [3, 4])
        assert bs.n_past(a) == 0


def test_full_policy_refuses_past_its_memory(tiny):
    path, _ = tiny
    with BatchSession(path, n_seq_max=2, budget=8, chunk=4, policy="full", n_threads=2) as bs:
        a = bs.add()
        bs.eval(a, list(range(3, 15)))  # 12 = memory
        with pytest.raises(ValueError, match="holds every token"):
            bs.eval(a, [3])
        assert bs.n_past(a) == 12


def test_errors_unknown_removed_closed(tiny):
    path, model = tiny
    bs = BatchSession(path, n_seq_max=2, budget=8, chunk=4, n_threads=2)
    a = bs.add()
    bs.eval(a, [3, 4, 5])
    for bad in (1, 7, -1, "0", True, None):
        with pytest.raises(UnknownSequenceError):
            bs.eval(bad, [3])
    with pytest.raises(UnknownSequenceError):
        bs.step({a: [3], 5: [4]})
    assert bs.n_past(a) == 3  # the refused step changed nothing
    with pytest.raises(ValueError, match="at least one token"):
        bs.step({a: []})
    with pytest.raises(ValueError, match="token ids"):
        bs.step({a: [model.n_vocab]})
    with pytest.raises(ValueError, match="mapping"):
        bs.step({})
    with pytest.raises(RuntimeError, match="no evaluated token"):
        bs.logits(bs.add())
    bs.remove(a)
    for call in (lambda: bs.eval(a, [3]), lambda: bs.logits(a), lambda: bs.remove(a), lambda: bs.reset(a)):
        with pytest.raises(UnknownSequenceError):
            call()
    bs.close()
    bs.close()
    for call in (lambda: bs.add(), lambda: bs.eval(0, [3]), lambda: bs.sequences, lambda: bs.can_add()):
        with pytest.raises(SessionClosedError):
            call()


def test_reset_and_busy(tiny):
    path, _ = tiny
    with BatchSession(path, n_seq_max=2, budget=8, chunk=4, type_k="f32", type_v="f32", n_threads=2) as bs:
        a, b = bs.add(), bs.add()
        first = bs.step({a: [3, 4, 5, 6], b: [7, 8]})
        bs.step({a: list(range(3, 30)), b: [9]})
        bs.reset(a)
        assert bs.n_past(a) == 0 and bs.n_occupied(a) == 0 and bs.n_past(b) == 3
        again = bs.eval(a, [3, 4, 5, 6])
        np.testing.assert_allclose(again, first[a], rtol=1e-5, atol=1e-5)
        entered, release = threading.Event(), threading.Event()
        errors = []

        def hold():
            with bs._lock:
                entered.set()
                release.wait()

        t = threading.Thread(target=hold)
        t.start()
        entered.wait()
        try:
            bs.eval(a, [3])
        except SessionBusyError as e:
            errors.append(e)
        release.set()
        t.join()
        assert errors


def test_single_sequence_api_is_refused_on_a_batch_engine(tiny):
    path, _ = tiny
    from tova_cpp._ffi import ffi, lib

    with BatchSession(path, n_seq_max=2, budget=8, chunk=4, n_threads=2) as bs:
        toks = ffi.new("int32_t[]", [3, 4])
        rc = lib.tova_engine_decode(
            bs._engine, ffi.cast("void *", bs._ctx), toks, 2, 0, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL
        )
        assert rc == lib.TOVA_ERR_ARG
        assert "decode_batch" in ffi.string(lib.tova_engine_last_error(bs._engine)).decode()
        seqs, counts = ffi.new("int32_t[]", [0, 0]), ffi.new("int32_t[]", [1, 1])
        bs.add()
        rc = lib.tova_engine_decode_batch(
            bs._engine, ffi.cast("void *", bs._ctx), seqs, counts, 2, toks, ffi.NULL
        )
        assert rc == lib.TOVA_ERR_ARG  # a sequence twice in one batch
        assert lib.tova_engine_decode_batch(bs._engine, ffi.NULL, seqs, counts, 1, toks, ffi.NULL) == -1
        assert lib.tova_engine_seq_add(bs._engine, 5, 8, 4, 0, 1) == lib.TOVA_ERR_ARG  # memory < budget
        assert lib.tova_engine_seq_add(bs._engine, 99, 8, 12, 0, 1) == lib.TOVA_ERR_ARG  # id out of range
        assert bs.sequences == [0]


def test_generate_batch_matches_one_at_a_time(tiny):
    """Greedy batched generation gives each prompt the text it gets alone (continuous batching: 5 prompts,
    room for 2 at a time)."""
    path, model = tiny
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, model.n_vocab, size=n).tolist() for n in (4, 9, 17, 6, 12)]
    kw = dict(budget=8, chunk=4, type_k="f32", type_v="f32", n_threads=2)
    with BatchSession(path, n_seq_max=2, **kw) as bs:
        together = list(stream_generate_batch(bs, prompts, max_tokens=12, temperature=0.0))
        assert bs.sequences == []  # every finished sequence was removed
        texts = generate_batch(bs, prompts, max_tokens=12, temperature=0.0)
    for i, p in enumerate(prompts):
        with BatchSession(path, n_seq_max=1, **kw) as one:
            (alone_text,) = generate_batch(one, [p], max_tokens=12, temperature=0.0)
        mine = [r for r in together if r.index == i]
        assert mine[-1].finish_reason in ("stop", "length")
        assert "".join(r.text for r in mine) == texts[i] == alone_text
        assert [r.token for r in mine] == [r.token for r in stream_generate_batch_alone(path, p, kw)]


def stream_generate_batch_alone(path, prompt, kw):
    with BatchSession(path, n_seq_max=1, **kw) as one:
        return list(stream_generate_batch(one, [prompt], max_tokens=12, temperature=0.0))


def test_engine_failure_empties_every_sequence(tiny):
    """A failure after decoding began leaves no sequence half-updated: all are emptied, stay added, and work."""
    path, _ = tiny
    from tova_cpp._ffi import lib

    with BatchSession(path, n_seq_max=2, budget=8, chunk=4, n_threads=2) as bs:
        a, b = bs.add(), bs.add()
        bs.step({a: [3, 4, 5], b: [6, 7]})
        # desynchronise on purpose: the engine forgets its cells (and positions), llama.cpp keeps them, so
        # llama_decode refuses the next batch's positions
        assert lib.tova_engine_set_cells(bs._engine, bs.n_cells) == 0
        with pytest.raises(EngineError, match="every sequence was emptied"):
            bs.step({a: [3], b: [4]})
        for seq in (a, b):
            assert bs.n_past(seq) == 0 and bs.n_occupied(seq) == 0 and bs.pos_window(seq) == (-1, -1)
        bs.step({a: [3, 4], b: [5]})
        assert (bs.n_past(a), bs.n_past(b)) == (2, 1)


def test_bench_batch_logits_flag_and_split(tiny, tmp_path, capsys):
    """`tova bench batch` decodes without copying the logits unless --logits 1, says which in its table and CSV,
    and writes the per-step split (engine, decode, python; score and cut parts) of what it measured."""
    import csv

    from tova_cpp.bench import main

    path, _ = tiny
    argv = ["batch", "-m", str(path), "--context", "128", "--full-seqs", "4", "--policies", "tova"]
    argv += ["--budgets", "16", "--chunk", "8", "--seqs", "2", "-n", "8", "-r", "1", "--evict-interval", "4"]
    argv += ["-t", "1", "--in-process", "--no-plot", "-fa", "1"]
    rows = {}
    for flag in ("0", "1"):
        out = tmp_path / flag
        assert main([*argv, "--logits", flag, "-o", str(out)]) == 0
        with open(out / "batch.csv", newline="") as f:
            (rows[flag],) = list(csv.DictReader(f))
    table = capsys.readouterr().out
    assert "| not read |" in table and "| copied |" in table
    assert (rows["0"]["logits"], rows["1"]["logits"]) == ("False", "True")
    for r in rows.values():
        ms = {k: float(v) for k, v in r.items() if k.endswith("_ms")}
        assert ms["engine_ms"] >= ms["decode_ms"] > 0 and ms["decode_unscored_ms"] > 0
        assert ms["score_ms"] > 0 and ms["score_per_scored_ms"] >= ms["score_ms"]  # a cut every 4 steps
        assert ms["cut_ms"] >= ms["choose_ms"] >= 0
        assert abs(ms["score_ms"] - ms["score_build_ms"] - ms["score_compute_ms"] - ms["score_read_ms"]) < 0.5


def test_bench_batch_plain_rows(tiny, tmp_path):
    """`tova bench batch --plain` follows each configuration with llama.cpp alone at its sequences, cells and
    prompt (the reference a many-sequence target is set against): a row per sequence count, decoding."""
    import csv
    import math

    from tova_cpp.bench import main

    path, _ = tiny
    argv = ["batch", "-m", str(path), "--context", "128", "--full-seqs", "4", "--policies", "tova", "--plain"]
    argv += [
        "--budgets",
        "16",
        "--chunk",
        "8",
        "--seqs",
        "1,2",
        "-n",
        "4",
        "-r",
        "1",
        "--evict-interval",
        "4",
    ]
    argv += ["-t", "1", "--in-process", "--no-plot", "-o", str(tmp_path)]
    assert main(argv) == 0
    with open(tmp_path / "batch.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["policy"], r["n_seqs"]) for r in rows] == [
        ("tova", "1"),
        ("tova", "2"),
        ("plain", "1"),
        ("plain", "2"),
    ]
    for tova_row, plain_row in zip(rows[:2], rows[2:], strict=True):
        assert plain_row["cells_per_seq"] == tova_row["cells_per_seq"]
        assert plain_row["kv_cells"] == tova_row["kv_cells"]
        assert float(plain_row["tg_tps"]) > 0 and math.isnan(float(plain_row["engine_ms"]))


@pytest.fixture
def cuda_graphs(monkeypatch):
    """A fresh process as far as the CUDA-graph guard knows (no GPU context opened yet), on a build that claims
    GPU offload, with GGML_CUDA_DISABLE_GRAPHS and TOVA_CUDA_GRAPHS unset; the environment is restored after."""
    import llama_cpp

    from tova_cpp import session as session_mod

    monkeypatch.setattr(session_mod, "_CUDA_GRAPHS", session_mod._CudaGraphs())
    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: True)
    for name in ("GGML_CUDA_DISABLE_GRAPHS", "TOVA_CUDA_GRAPHS"):
        monkeypatch.setenv(name, "placeholder")  # recorded as unset, so undone after the test
        monkeypatch.delenv(name)
    return session_mod._CUDA_GRAPHS


def _open_batch(path, **kw):
    with BatchSession(path, n_seq_max=2, budget=16, chunk=CHUNK, n_threads=1, **kw):
        pass


def test_first_gpu_batch_session_turns_cuda_graphs_off(tiny, cuda_graphs, recwarn):
    # a CPU-only build ignores n_gpu_layers; the guard decides on the offload support it is told of
    _open_batch(tiny[0], n_gpu_layers=99)
    assert os.environ.get("GGML_CUDA_DISABLE_GRAPHS") == "1"
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize(
    "setup",
    ["cpu_only", "user_value", "opt_out", "no_layers_offloaded"],
)
def test_cuda_graphs_left_alone(tiny, cuda_graphs, monkeypatch, recwarn, setup):
    import llama_cpp

    kw = {"n_gpu_layers": 99}
    if setup == "cpu_only":
        monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: False)
    elif setup == "user_value":
        monkeypatch.setenv("GGML_CUDA_DISABLE_GRAPHS", "")  # any value: the user's, untouched
    elif setup == "opt_out":
        monkeypatch.setenv("TOVA_CUDA_GRAPHS", "1")
    else:
        kw["n_gpu_layers"] = 0
    _open_batch(tiny[0], **kw)
    assert os.environ.get("GGML_CUDA_DISABLE_GRAPHS") == ("" if setup == "user_value" else None)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_gpu_session_first_leaves_graphs_on_and_warns_once(tiny, cuda_graphs):
    with Session(tiny[0], budget=16, n_gpu_layers=99, n_threads=1):
        pass
    assert "GGML_CUDA_DISABLE_GRAPHS" not in os.environ  # a single sequence keeps llama.cpp's default
    with pytest.warns(RuntimeWarning, match="CUDA graphs"):
        _open_batch(tiny[0], n_gpu_layers=99)
    assert "GGML_CUDA_DISABLE_GRAPHS" not in os.environ  # too late to take effect: not pretended
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _open_batch(tiny[0], n_gpu_layers=99)  # once per process


def test_plain_llama_baseline_takes_the_same_cuda_graph_setting(tiny, cuda_graphs):
    """`tova bench batch --plain` (llama.cpp alone, many sequences, in a process of its own by default) runs
    under the guard too: on a GPU it compares with the BatchSession rows under the same CUDA graph setting and is
    spared the same abort."""
    from tova_cpp.bench.batch import _measure_plain

    row = _measure_plain(
        path=tiny[0], n=2, prompt=8, per_seq=32, n_ctx=64, n_gen=2, reps=1, threads=1, chunk=8, n_gpu_layers=99,
        flash_attn=False, type_k="f16", type_v="f16", kv_unified=False, verbose=False, logits=False,
    )  # fmt: skip
    assert row["n_seqs"] == 2 and row["kv_cells"] == 64  # it ran
    assert os.environ.get("GGML_CUDA_DISABLE_GRAPHS") == "1"
