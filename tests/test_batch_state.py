"""Park one sequence of a BatchSession to disk and resume it (BatchSession.save/load, save_state/load_state).

Why the schedule below is what it is: a unified KV cache sums each sequence's attention over the cells in index
order (other sequences' cells add exact zeros), so a sequence's last bits depend on where its cells lie (the
same run with every cell shifted by 5 differs by ~1e-5). A restored sequence therefore returns to the cell
indices it had, and the schedule keeps each sequence's cells where the uninterrupted run keeps them: a and c
(stepped first) fill, each step, the two cells their own cuts freed; b (stepped last, its prompt placed above
theirs) its own. So b's cells stay free while it is parked and everything is asserted bit for bit. When other
sequences did take the parked sequence's cells it lands in the lowest free cells: tested on its own (same kept
sets, logits within the float reordering tests/test_batch.py measures). Tiny random model, CPU."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from tiny_gguf import write_tiny_llama

from tova_cpp import StateError
from tova_cpp._ffi import ffi, lib
from tova_cpp.batch import BatchSession
from tova_cpp.errors import CapacityError, UnknownSequenceError
from tova_cpp.state import parse_engine_state, parse_seq_blob, read_file

# parking one sequence is supported on the unified cache (streams refuse it: the last test)
SESSION = {"n_seq_max": 4, "budget": 16, "chunk": 8, "n_threads": 2, "kv_unified": True}
SEQS = {"a": {"budget": 16}, "c": {"budget": 10, "keep": 2}, "b": {"budget": 12, "evict_interval": 2}}
ORDER = ("a", "c", "b")  # the order of every step: a and c first, b last
START = {"a": 0, "c": 0, "b": 4}
# prompts within each budget (a, c: no cut inside, so their cells stay packed), b's over its budget (cut at once)
_rng = np.random.default_rng(5)
PROMPTS = {n: _rng.integers(0, 64, size).tolist() for n, size in (("a", 14), ("c", 8), ("b", 20))}
T0, T1, STEPS = 14, 18, 26  # b is saved (or paused) at T0, back at T1
CASES = [("tova", False), ("tova", True), ("h2o", False), ("window", False), ("sink", False)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-batch-state") / "tiny.gguf"
    write_tiny_llama(path)
    return path


def cells_of(bs: BatchSession, seq: int) -> np.ndarray:
    owner = np.empty(bs.n_cells, dtype=np.int32)
    assert lib.tova_engine_cell_seqs(bs._engine, ffi.cast("int32_t *", owner.ctypes.data), owner.size) == 0
    return np.flatnonzero(owner == seq)


def snapshot(bs: BatchSession) -> dict:
    """Everything each active sequence holds: llama.cpp's rows, the engine's cells and bookkeeping, logits."""
    out = {}
    for seq in bs.sequences:
        st = bs.save_state(seq)
        out[seq] = (st.n_tokens, st.llama_state, st.engine_state, st.scores.tobytes(), bs.settings(seq))
    return out


def run(path, policy, flash_attn=False, mode="uninterrupted", park_file=None, **kw):
    """Greedy a, c and b under the schedule above. mode "uninterrupted": b steps throughout; "idle": b takes no
    step in [T0, T1); "park": at T0 b is saved to park_file and removed (a new, empty conversation takes its id),
    at T1 it is loaded into a new sequence (another id); a and c step throughout.
    Returns ({name: {step: (logits, kept, token)}}, {name: TovaState at T0} in the uninterrupted run)."""
    rec = {n: {} for n in ORDER}
    saved = {}
    with BatchSession(path, policy=policy, flash_attn=flash_attn, **{**SESSION, **kw}) as bs:
        ids, nxt = {}, {}
        for t in range(STEPS):
            if t == T0 and mode == "uninterrupted":
                saved = {n: bs.save_state(ids[n]) for n in ORDER}
            if t == T0 and mode == "park":
                b_cells, b_kept, b_logits = (
                    cells_of(bs, ids["b"]),
                    bs.kept_positions(ids["b"]),
                    bs.logits(ids["b"]),
                )
                bs.save(ids["b"], park_file)
                old = ids.pop("b")
                bs.remove(old)
                assert bs.add() == old  # another conversation holds b's old id
            if t == T1 and mode == "park":
                others = snapshot(bs)
                ids["b"] = bs.load(None, park_file)
                assert ids["b"] != old
                assert {s: v for s, v in snapshot(bs).items() if s != ids["b"]} == others  # untouched
                assert np.array_equal(cells_of(bs, ids["b"]), b_cells)  # back in its own cells
                assert np.array_equal(bs.kept_positions(ids["b"]), b_kept)
                assert np.array_equal(bs.logits(ids["b"]), b_logits)
            batch = {}
            for n in ORDER:
                if t == START[n]:
                    ids[n] = bs.add(**SEQS[n])
                    batch[ids[n]] = PROMPTS[n]
                elif n in ids and not (n == "b" and mode == "idle" and T0 <= t < T1):
                    batch[ids[n]] = [nxt[n]]
            out = bs.step(batch)
            for n in ORDER:
                if n in ids and ids[n] in batch:
                    nxt[n] = int(np.argmax(out[ids[n]]))
                    rec[n][t] = (out[ids[n]], bs.kept_positions(ids[n]), nxt[n])
    return rec, saved


def resume(path, policy, flash_attn, states, **kw):
    """A fresh BatchSession: the three saved sequences loaded in another order (so other ids), then the
    schedule's steps from T0 on. Returns {name: {step: (logits, kept, token)}}."""
    rec = {n: {} for n in ORDER}
    with BatchSession(path, policy=policy, flash_attn=flash_attn, **{**SESSION, **kw}) as bs:
        ids = {n: bs.load_state(None, states[n]) for n in ("b", "c", "a")}
        nxt = {n: int(np.argmax(bs.logits(ids[n]))) for n in ORDER}
        for t in range(T0, STEPS):
            out = bs.step({ids[n]: [nxt[n]] for n in ORDER})
            for n in ORDER:
                nxt[n] = int(np.argmax(out[ids[n]]))
                rec[n][t] = (out[ids[n]], bs.kept_positions(ids[n]), nxt[n])
    return rec


def assert_same(got: dict, want: dict, what: str) -> None:
    """Bit-identical logits, equal kept sets and greedy tokens, step for step (dict order)."""
    assert len(got) == len(want) > 0, what
    for (tg, (lg, kg, xg)), (tw, (lw, kw, xw)) in zip(got.items(), want.items(), strict=True):
        assert np.array_equal(kg, kw), f"{what}: kept sets differ at step {tg} (reference step {tw})"
        np.testing.assert_array_equal(lg, lw, err_msg=f"{what}: logits differ at step {tg} (reference {tw})")
        assert xg == xw, what


def has_evicted(rec: dict) -> bool:
    """Every layer of every sequence dropped positions (kept sets are not 0..n-1)."""
    return all((kept[:, -1] >= kept.shape[1]).all() for _, kept, _ in (r[max(r)] for r in rec.values()))


@pytest.mark.parametrize("policy,flash_attn", CASES)
def test_parked_sequence_resumes_bit_identical_while_others_continue(tiny, tmp_path, policy, flash_attn):
    uninterrupted, _ = run(tiny, policy, flash_attn)
    idle, _ = run(tiny, policy, flash_attn, mode="idle")
    parked, _ = run(tiny, policy, flash_attn, mode="park", park_file=tmp_path / "b.tova")
    assert has_evicted(uninterrupted)
    # b after its load continues as b after T0 in the run that never stopped it
    after_load = {t: v for t, v in parked["b"].items() if t >= T1}
    want = {t: v for t, v in uninterrupted["b"].items() if T0 <= t < T0 + len(after_load)}
    assert_same(after_load, want, "b resumed vs uninterrupted")
    # a and c are bit-identical to the run in which b stayed in memory, paused for the same steps
    for n in ("a", "c"):
        assert_same(parked[n], idle[n], f"{n} beside a parked b vs beside a paused b")
    assert_same(
        {t: v for t, v in parked["b"].items() if t < T0},
        {t: uninterrupted["b"][t] for t in range(4, T0)},
        "b",
    )


@pytest.mark.parametrize("policy,flash_attn", CASES)
def test_every_sequence_resumes_in_a_fresh_session(tiny, policy, flash_attn):
    uninterrupted, saved = run(tiny, policy, flash_attn)
    again = resume(tiny, policy, flash_attn, saved)
    for n in ORDER:
        assert_same(
            again[n], {t: v for t, v in uninterrupted[n].items() if t >= T0}, f"{n} in a fresh session"
        )


def test_every_sequence_resumes_in_a_new_process(tiny, tmp_path):
    want = {}
    for policy, fa in CASES:
        rec, saved = run(tiny, policy, fa)
        for n in ORDER:
            saved_path = tmp_path / f"{policy}-{fa}-{n}.tova"
            from tova_cpp.state import write_file

            write_file(saved_path, saved[n])
            want[(policy, fa, n)] = {t: v for t, v in rec[n].items() if t >= T0}
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_batch_state import CASES, ORDER, resume
        from tova_cpp.state import read_file
        out = {{}}
        for policy, fa in CASES:
            states = {{n: read_file({str(tmp_path)!r} + f"/{{policy}}-{{fa}}-{{n}}.tova") for n in ORDER}}
            rec = resume({str(tiny)!r}, policy, fa, states)
            for n in ORDER:
                for t, (lg, kept, tok) in rec[n].items():
                    out[f"{{policy}}|{{fa}}|{{n}}|{{t}}|logits"] = lg
                    out[f"{{policy}}|{{fa}}|{{n}}|{{t}}|kept"] = kept
                    out[f"{{policy}}|{{fa}}|{{n}}|{{t}}|token"] = np.array(tok)
        np.savez({str(tmp_path / "out.npz")!r}, **out)
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=600)
    got = np.load(tmp_path / "out.npz")
    for (policy, fa, n), steps in want.items():
        rec = {
            t: tuple(got[f"{policy}|{fa}|{n}|{t}|{k}"] for k in ("logits", "kept", "token")) for t in steps
        }
        rec = {t: (lg, kept, int(tok)) for t, (lg, kept, tok) in rec.items()}
        assert_same(rec, steps, f"{policy} fa={fa} {n} in a new process")


@pytest.mark.parametrize("policy", ["tova", "h2o"])
def test_cells_taken_by_others_land_in_the_lowest_free_cells(tiny, tmp_path, policy):
    """A new conversation takes b's cells while b is parked: b is loaded into the lowest free cells, the others
    are untouched, and b keeps the uninterrupted run's kept sets with logits equal up to float reordering
    (F32 cache and tests/test_batch.py's tolerance, as a sequence in another batch composition)."""
    kw = {"type_k": "f32", "type_v": "f32"}
    uninterrupted, saved = run(tiny, policy, **kw)
    with BatchSession(tiny, policy=policy, **{**SESSION, **kw}) as bs:
        d = bs.add(budget=24, evict_interval=1)
        bs.eval(d, PROMPTS["b"] + PROMPTS["a"])  # takes the lowest cells, where b's were
        assert np.intersect1d(cells_of(bs, d), parse_engine_state(saved["b"].engine_state).cells).size
        free_before = np.setdiff1d(np.arange(bs.n_cells), cells_of(bs, d))
        others = snapshot(bs)
        b = bs.load_state(None, saved["b"])
        assert not np.array_equal(cells_of(bs, b), parse_engine_state(saved["b"].engine_state).cells)
        assert np.array_equal(cells_of(bs, b), free_before[: bs.n_occupied(b)])  # packed, lowest first
        assert {s: v for s, v in snapshot(bs).items() if s != b} == others
        nxt = int(np.argmax(bs.logits(b)))
        for t in range(T0, STEPS):
            lg = bs.step({d: [3], b: [nxt]})[b]
            want_lg, want_kept, want_tok = uninterrupted["b"][t]
            assert np.array_equal(bs.kept_positions(b), want_kept), f"step {t}"
            scale = np.abs(want_lg).max()
            np.testing.assert_allclose(lg, want_lg, rtol=1e-5, atol=1e-5 * scale, err_msg=f"step {t}")
            nxt = int(np.argmax(lg))
            assert nxt == want_tok


def test_load_into_a_sequence_replaces_what_it_held(tiny):
    _, saved = run(tiny, "tova")
    with BatchSession(tiny, policy="tova", **SESSION) as bs:
        x = bs.add(**SEQS["b"])
        bs.eval(x, PROMPTS["a"] * 3)
        assert bs.load_state(x, saved["b"]) == x
        st = bs.save_state(x)
        # the same cells (the engine's export names them), rows and positions; only the sequence id differs
        assert (st.engine_state, st.n_tokens) == (saved["b"].engine_state, saved["b"].n_tokens)
        got, want = parse_seq_blob(st.llama_state), parse_seq_blob(saved["b"].llama_state)
        assert np.array_equal(got.positions, want.positions)
        for (tg, sg, rg), (tw, sw, rw) in zip(got.k, want.k, strict=True):
            assert (tg, sg) == (tw, sw) and np.array_equal(rg, rw)
        for (tg, sg, eg, rg), (tw, sw, ew, rw) in zip(got.v, want.v, strict=True):
            assert (tg, sg, eg) == (tw, sw, ew) and np.array_equal(rg, rw)
        assert bs.n_past(x) == saved["b"].n_tokens


def test_empty_sequence_round_trips(tiny, tmp_path):
    with BatchSession(tiny, **SESSION) as bs:
        a = bs.add()
        bs.save(a, tmp_path / "e.tova")
        assert read_file(tmp_path / "e.tova").n_tokens == 0
        bs.eval(a, [3, 4, 5])
        assert bs.load(a, tmp_path / "e.tova") == a
        assert (bs.n_past(a), bs.n_occupied(a), bs.pos_window(a)) == (0, 0, (-1, -1))
        with pytest.raises(RuntimeError, match="no evaluated token"):
            bs.logits(a)
        bs.eval(a, [3, 4])
        assert bs.n_past(a) == 2


# -- refusals: a typed error, nothing changed (the other sequences untouched) ----------------------------------


@pytest.fixture(scope="module")
def parked(tiny, tmp_path_factory):
    """b of the uninterrupted tova run, saved at T0 to a file."""
    path = tmp_path_factory.mktemp("parked") / "b.tova"
    _, saved = run(tiny, "tova")
    from tova_cpp.state import write_file

    write_file(path, saved["b"])
    return path


def busy_session(path, **kw) -> BatchSession:
    bs = BatchSession(path, **{**SESSION, "policy": "tova", **kw})
    a, x = bs.add(), bs.add(**SEQS["b"])
    bs.step({a: PROMPTS["a"] * 2, x: PROMPTS["c"]})
    return bs


@pytest.mark.parametrize(
    "session_kw, seq_kw, match",
    [
        ({}, {"budget": 13, "evict_interval": 2}, r"budget=12 \(here: 13\)"),
        ({}, {"budget": 12, "keep": 1, "evict_interval": 2}, "keep"),
        ({"policy": "window"}, None, "policy='tova'"),
        ({"type_k": "f32", "type_v": "f32"}, None, "type_k"),
        ({"flash_attn": True}, None, "flash_attn"),
        ({"chunk": 4}, None, "chunk"),
    ],
)
def test_other_settings_are_refused_and_change_nothing(tiny, parked, session_kw, seq_kw, match):
    with busy_session(tiny, **session_kw) as bs:
        target = bs.add(**seq_kw) if seq_kw is not None else None
        before = snapshot(bs)
        with pytest.raises(StateError, match=match):
            bs.load(target, parked)
        assert snapshot(bs) == before


def test_another_model_is_refused(tiny, parked, tmp_path):
    other = tmp_path / "other.gguf"
    write_tiny_llama(other, seed=1)  # same shape and metadata, other weights
    with busy_session(other) as bs:
        before = snapshot(bs)
        with pytest.raises(StateError, match="another model"):
            bs.load(None, parked)
        assert snapshot(bs) == before


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "garbage"])
def test_damaged_files_are_refused_and_change_nothing(tiny, parked, tmp_path, damage):
    data = bytearray(parked.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 100]
    elif damage == "flip":
        data[len(data) // 2] ^= 0x01
    elif damage == "empty":
        data = bytearray()
    else:
        data = bytearray(range(256)) * 4
    path = tmp_path / "bad.tova"
    path.write_bytes(bytes(data))
    with busy_session(tiny) as bs:
        before = snapshot(bs)
        with pytest.raises(StateError, match="truncated|corrupted|not a tova_cpp session"):
            bs.load(None, path)
        with pytest.raises(StateError):
            bs.load(bs.sequences[1], path)
        assert snapshot(bs) == before


def test_a_sequence_that_does_not_fit_is_refused(tiny, parked):
    with busy_session(tiny, n_seq_max=2) as bs:  # both ids in use
        before = snapshot(bs)
        with pytest.raises(CapacityError, match="n_seq_max"):
            bs.load(None, parked)
        assert snapshot(bs) == before
    with BatchSession(tiny, **{**SESSION, "n_ctx": 256, "policy": "tova"}) as bs:
        a, x = bs.add(budget=112), bs.add(budget=112)  # 2 x 120 of 256 cells reserved; b needs 12 + 8
        bs.step({a: PROMPTS["a"], x: PROMPTS["c"]})
        before = snapshot(bs)
        with pytest.raises(CapacityError, match="does not fit"):
            bs.load(None, parked)
        assert snapshot(bs) == before
    with busy_session(tiny) as bs:
        with pytest.raises(UnknownSequenceError):
            bs.load(3, parked)


def test_a_failing_llama_cpp_load_rolls_back(tiny, parked, monkeypatch):
    import llama_cpp

    real = llama_cpp.llama_state_seq_set_data
    calls = []

    def fail_first(*args):
        calls.append(1)
        return 0 if len(calls) == 1 else real(*args)

    with busy_session(tiny) as bs:
        target = bs.sequences[1]  # holds a conversation of b's settings
        before = snapshot(bs)
        monkeypatch.setattr(llama_cpp, "llama_state_seq_set_data", fail_first)
        with pytest.raises(StateError, match="refused"):
            bs.load(target, parked)
        assert len(calls) == 2  # the rollback loaded the previous conversation back, into its own cells
        assert snapshot(bs) == before
        calls.clear()
        with pytest.raises(StateError, match="refused"):
            bs.load(None, parked)  # a new sequence is removed again
        assert snapshot(bs) == before and len(bs.sequences) == 2


def test_a_session_file_loads_into_a_batch_sequence(tiny, tmp_path):
    """Session and BatchSession write one format: a Session's conversation continues in a sequence of a batch
    (kept sets as in the Session; logits up to the batch's float reordering), and a sequence's file is refused
    by a Session (it names no n_ubatch: a sequence's decodes were shared)."""
    from tova_cpp import Session

    kw = {"budget": 12, "chunk": 8, "policy": "tova", "n_threads": 2, "type_k": "f32", "type_v": "f32"}
    with Session(tiny, **kw) as s:
        s.eval(PROMPTS["b"] + PROMPTS["a"])
        s.save(tmp_path / "s.tova")
        want = []
        for _ in range(6):
            s.eval([int(np.argmax(s.logits()))])
            want.append((s.logits(), s.kept_positions()))
    with BatchSession(tiny, n_seq_max=2, kv_unified=True, **kw) as bs:
        x = bs.add()
        bs.eval(x, PROMPTS["c"])
        b = bs.load(None, tmp_path / "s.tova")
        for lg, kept in want:
            got = bs.eval(b, [int(np.argmax(bs.logits(b)))])
            assert np.array_equal(bs.kept_positions(b), kept)
            np.testing.assert_allclose(got, lg, rtol=1e-5, atol=1e-5 * np.abs(lg).max())
        bs.save(b, tmp_path / "b.tova")
    with Session(tiny, **kw) as s, pytest.raises(StateError, match="n_ubatch"):
        s.load(tmp_path / "b.tova")


def test_load_state_takes_a_tova_state(tiny):
    with BatchSession(tiny, **SESSION) as bs:
        for seq in (None, bs.add()):
            with pytest.raises(TypeError, match="TovaState"):
                bs.load_state(seq, b"not a state")
        assert bs.sequences == [0]


def test_per_sequence_streams_refuse_to_park(tiny, tmp_path):
    """Per-sequence streams (BatchSession's default) do not support saving or loading one sequence: a clear
    StateError before anything is read or changed, the sequence still stepping afterwards."""
    with BatchSession(tiny, **{**SESSION, "kv_unified": False}) as bs:
        a = bs.add()
        bs.eval(a, PROMPTS["a"])
        before = bs.logits(a).copy()
        with pytest.raises(StateError, match="kv_unified=True"):
            bs.save(a, tmp_path / "a.tova")
        assert not (tmp_path / "a.tova").exists()
        with BatchSession(tiny, **SESSION) as unified:
            u = unified.add()
            unified.eval(u, PROMPTS["a"])
            state = unified.save_state(u)
        with pytest.raises(StateError, match="kv_unified=True"):
            bs.load_state(a, state)
        assert bs.sequences == [a] and np.array_equal(bs.logits(a), before)
        bs.eval(a, [int(np.argmax(before))])
