"""Session on real models: exactness at budget >= tokens, long bounded runs, refusals."""

from __future__ import annotations

import importlib

import llama_cpp
import numpy as np
import pytest

import tova_cpp
from tova_cpp import ModelLoadError, Session, TovaVersionError

PROMPT = "The lighthouse keeper climbed the stairs every evening, counting the steps as he went."


def check_invariants(s: Session) -> None:
    kept = s.kept_positions()
    assert s.n_occupied <= s.budget
    lo, hi = s.pos_window()
    assert (lo, hi) == (s.n_past - s.n_occupied, s.n_past - 1)  # contiguous metadata window
    for row in kept:
        row = row[row >= 0]
        assert row.size == s.n_occupied
        assert np.unique(row).size == row.size
        assert row.max() <= s.n_past - 1


def plain_logits(path, tokens, n_ctx, n_batch, steps):
    """Greedy continuation with llama-cpp-python's own Llama (no engine), same context settings."""
    llm = llama_cpp.Llama(
        str(path),
        n_ctx=n_ctx,
        n_batch=n_batch,
        n_ubatch=n_batch,
        n_threads=2,
        flash_attn=False,
        logits_all=False,
        verbose=False,
    )

    def last():
        ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()

    llm.eval(tokens)
    out = [last()]
    for _ in range(steps):
        llm.eval([int(np.argmax(out[-1]))])
        out.append(last())
    llm.close()
    return out


@pytest.fixture(params=["tiny", "smollm2"])
def model_and_prompt(request, tmp_path):
    if request.param == "tiny":
        from tiny_gguf import write_tiny_llama

        path = tmp_path / "tiny.gguf"
        write_tiny_llama(path)
        return path, list(range(3, 40))
    path = request.getfixturevalue("smollm2_path")
    with Session(path, budget=8) as s:
        return path, s.tokenize(PROMPT)


def test_budget_above_sequence_equals_plain_llama_cpp(model_and_prompt):
    path, tokens = model_and_prompt
    with Session(path, budget=512, chunk=256, n_threads=2) as s:
        s.eval(tokens)
        ours = [s.logits()]
        for _ in range(64):
            s.eval([int(np.argmax(ours[-1]))])
            ours.append(s.logits())
        n_ctx = s.n_cells
    theirs = plain_logits(path, tokens, n_ctx, 256, 64)
    for a, b in zip(ours, theirs, strict=False):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("type_k", ["f16", "q8_0"])
def test_long_decode_keeps_the_cache_bounded(smollm2_path, type_k):
    with Session(smollm2_path, budget=128, chunk=64, type_k=type_k, n_threads=2) as s:
        s.eval(s.tokenize(PROMPT))
        for step in range(3000):
            logits = s.logits()
            assert np.isfinite(logits).all()
            s.eval([int(np.argmax(logits))])
            if step >= 128:
                assert s.n_occupied == 128
            if step % 250 == 0:
                check_invariants(s)
        check_invariants(s)
        kept = s.kept_positions()
        # layers keep different sets: per-layer eviction, not one shared set
        assert len({tuple(r) for r in kept}) > 1
        assert s.n_past == len(s.tokenize(PROMPT)) + 3000


@pytest.mark.parametrize("policy", ["window", "sink", "h2o"])
def test_baselines_on_smollm2_stay_bounded_and_per_layer(smollm2_path, policy):
    with Session(smollm2_path, budget=32, chunk=16, policy=policy, keep=2, n_threads=2) as s:
        s.eval(s.tokenize(PROMPT * 3))  # longer than memory: chunked cuts
        for _ in range(64):
            logits = s.logits()
            assert np.isfinite(logits).all()
            s.eval([int(np.argmax(logits))])
            check_invariants(s)
        kept = s.kept_positions()
        assert (kept[:, :2] == [0, 1]).all()  # keep
        n_sets = len({tuple(r) for r in kept})
        if policy == "h2o":
            assert n_sets > 1  # accumulated attention differs by layer
            # keep 2 + 30 unprotected cells: the 15 most recent + 15 heavy hitters
            assert (kept[:, -15:] == np.arange(s.n_past - 15, s.n_past)).all()
        else:
            assert n_sets == 1  # no scores: every layer keeps the same positions
            n_first = 4 if policy == "sink" else 2
            recent = np.arange(s.n_past - (32 - n_first), s.n_past)
            np.testing.assert_array_equal(kept[0], np.concatenate([np.arange(n_first), recent]))


@pytest.mark.parametrize("type_v", ["f16", "bf16", "f32"])
def test_graph_mover_matches_memcpy(smollm2_path, type_v):
    """Flash attention off stores V transposed (a cell is a column): the device path moves a layer's columns in a
    few graph nodes whatever their count, bit for bit what memcpy moves."""
    runs = []
    for force in (False, True):
        with Session(smollm2_path, budget=32, chunk=16, n_threads=2, type_v=type_v) as s:
            s.set_force_graph_mover(force)
            s.eval(s.tokenize(PROMPT * 3))  # longer than memory: chunked cuts
            first = s.engine_stats()
            logits = []
            for _ in range(100):
                logits.append(s.logits())
                s.eval([int(np.argmax(logits[-1]))])
                check_invariants(s)
            runs.append((np.array(logits), s.kept_positions()))
        if force:  # the prompt's cuts moved up to 16 rows per layer; a copy per row would be 2 nodes each
            assert 0 < first["move_nodes"] <= 16 * s.n_layer * first["cuts"]
        else:
            assert first["move_nodes"] == 0  # host cache: memcpy
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("type_k, type_v", [("f16", "f16"), ("q8_0", "q8_0"), ("q8_0", "f16")])
def test_graph_mover_moves_a_whole_cut_at_once(smollm2_path, type_k, type_v):
    """Flash attention on (rows, not columns): when every layer's K and V rows have one size they tile one span
    of the cache's buffer, and the device path moves a whole cut, all 30 layers, in one gather and one scatter;
    with K and V rows of different sizes it takes a gather and a scatter per tensor. Bit for bit what memcpy
    moves either way."""
    runs = []
    for force in (False, True):
        with Session(
            smollm2_path, budget=32, chunk=16, n_threads=2, flash_attn=True, type_k=type_k, type_v=type_v
        ) as s:
            s.set_force_graph_mover(force)
            s.eval(s.tokenize(PROMPT * 3))
            logits = []
            for _ in range(40):
                logits.append(s.logits())
                s.eval([int(np.argmax(logits[-1]))])
            st = s.engine_stats()
            runs.append((np.array(logits), s.kept_positions()))
        if force:
            per_cut = st["move_nodes"] / st["cuts"]
            if type_k == type_v:
                assert 0 < per_cut <= 4, per_cut
            else:
                assert 4 * s.n_layer <= per_cut <= 16 * s.n_layer, per_cut
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])


def test_chunked_prompt_never_exceeds_budget_plus_chunk(smollm2_path):
    with Session(smollm2_path, budget=40, chunk=16, n_threads=2) as s:
        tokens = s.tokenize(PROMPT * 6)
        assert len(tokens) > s.memory
        s.eval(tokens)
        assert s.n_occupied == 40
        check_invariants(s)


def test_reset_starts_clean(smollm2_path):
    with Session(smollm2_path, budget=64, chunk=32, n_threads=2) as s:
        tokens = s.tokenize(PROMPT)
        s.eval(tokens)
        first = s.logits()
        s.eval(tokens)
        s.reset()
        assert s.n_occupied == 0 and s.n_past == 0 and s.pos_window() == (-1, -1)
        s.eval(tokens)
        np.testing.assert_array_equal(s.logits(), first)


# -- refusals: typed errors, before any decode ----------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"budget": 0}, "budget"),
        ({"budget": True}, "budget"),
        ({"budget": 8, "chunk": 0}, "chunk"),
        ({"budget": 8, "chunk": 64, "n_ubatch": 32}, "n_ubatch"),
        ({"budget": 8, "policy": "lru"}, "policy"),
        ({"budget": 8, "type_k": "q9"}, "cache type"),
        ({"budget": 8, "type_v": "q8_0"}, "flash attention"),
        ({"budget": 8, "evict_interval": 0}, "evict_interval"),
        ({"budget": 8, "evict_interval": True}, "evict_interval"),
        ({"budget": 8, "flash_attn": "yes"}, "flash_attn"),
    ],
)
def test_bad_arguments_are_value_errors(smollm2_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Session(smollm2_path, **kwargs)


def test_bad_files_are_model_load_errors(tmp_path, smollm2_path):
    with pytest.raises(ModelLoadError, match="not found"):
        Session(tmp_path / "missing.gguf", budget=8)
    text = tmp_path / "notes.gguf"
    text.write_text("hello")
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        Session(text, budget=8)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(smollm2_path.read_bytes()[: 1 << 20])
    with pytest.raises(ModelLoadError, match="could not load"):
        Session(truncated, budget=8)


def test_bad_tokens_lose_nothing(smollm2_path):
    with Session(smollm2_path, budget=16, chunk=8, n_threads=2) as s:
        s.eval(s.tokenize(PROMPT))
        before = (s.n_past, s.kept_positions().copy(), s.logits())
        for bad in ([], [-1], [s.n_vocab]):
            with pytest.raises(ValueError):
                s.eval(bad)
        assert s.n_past == before[0]
        np.testing.assert_array_equal(s.kept_positions(), before[1])
        np.testing.assert_array_equal(s.logits(), before[2])


def test_sliding_window_model_needs_a_budget_of_its_window(gemma3_path):
    """gemma3-270m slides over 512 tokens: a budget below 511 would evict what its window layers see
    (docs/SWA.md); tests/test_swa.py covers the managed case."""
    with pytest.raises(ValueError, match="budget must be at least 511"):
        Session(gemma3_path, budget=64)


def test_other_llama_cpp_python_version_is_refused(monkeypatch):
    monkeypatch.setattr(llama_cpp, "__version__", "0.3.35")
    with pytest.raises(TovaVersionError, match="llama-cpp-python==0.3.36"):
        importlib.reload(tova_cpp._ffi)


def test_logits_all_returns_one_row_per_token(smollm2_path):
    with Session(smollm2_path, budget=24, chunk=8, n_threads=2) as s:
        tokens = s.tokenize(PROMPT * 3)
        assert len(tokens) > s.memory  # pieces with cuts in between
        rows = s.eval(tokens, logits_all=True)
        assert rows.shape == (len(tokens), s.n_vocab)
        np.testing.assert_array_equal(rows[-1], s.logits())
        assert np.isfinite(rows).all()


# -- policies, keep and n_sink: typed validation on a tiny model (no download needed) --------------------
@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    from tiny_gguf import write_tiny_llama

    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_tiny_llama(path)
    return path


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"keep": -1}, "keep"),
        ({"keep": 8}, r"keep must be an integer in \[0, budget=8\)"),  # keep >= budget is refused
        ({"keep": 100}, "keep"),
        ({"keep": True}, "keep"),
        ({"keep": 1.0}, "keep"),
        ({"policy": "sink", "n_sink": 8}, "n_sink"),
        ({"policy": "sink", "n_sink": -1}, "n_sink"),
        ({"policy": "sink", "n_sink": "4"}, "n_sink"),
        ({"policy": "sink", "budget": 4}, "n_sink"),  # the default n_sink=4 needs budget > 4
        ({"policy": "tova", "n_sink": 2}, "'sink' only"),
        ({"policy": "h2o", "flash_attn": True}, "flash_attn"),
        ({"policy": "H2O"}, "policy"),
    ],
)
def test_policy_arguments_are_value_errors(tiny_path, kwargs, match):
    kwargs = {"budget": 8, **kwargs}
    with pytest.raises(ValueError, match=match):
        Session(tiny_path, **kwargs)


@pytest.mark.parametrize("policy", sorted(tova_cpp.POLICIES))
def test_every_policy_runs_bounded_with_the_largest_keep(tiny_path, policy):
    kw = {"n_sink": 2} if policy == "sink" else {}
    with Session(tiny_path, budget=8, chunk=4, policy=policy, keep=7, n_threads=2, **kw) as s:
        assert (s.policy, s.keep) == (policy, 7)
        s.eval(list(range(3, 15)) if policy != "full" else list(range(3, 9)))
        for t in range(6):
            s.eval([t + 3])
            kept = s.kept_positions()
            assert s.n_occupied == (7 + t if policy == "full" else 8)
            assert (kept[:, :7] == np.arange(7)).all()  # the protected prefix, in every layer
            if policy in ("window", "sink", "h2o"):
                assert (kept[:, 7] == s.n_past - 1).all()  # one unprotected cell: the newest token


@pytest.mark.parametrize("policy, syncs", [("full", 0), ("window", 0), ("sink", 0), ("tova", 3), ("h2o", 3)])
def test_only_scoring_policies_capture(tiny_path, policy, syncs):
    from tova_cpp._ffi import lib

    # the tiny model has 3 layers; the cells of new tokens are read without a sync on host buffers
    with Session(tiny_path, budget=8, chunk=4, policy=policy, n_threads=2) as s:
        s.eval(list(range(3, 9)))  # fits in the budget: no cut follows, so tova captures nothing
        assert lib.tova_engine_n_observed(s._engine) == (syncs if policy == "h2o" else 0)
        s.eval(list(range(3, 8)))  # 6 + 5 > 8: ubatches of 4 + 1 tokens, a cut after the last one
        assert lib.tova_engine_n_observed(s._engine) == syncs  # counts the last decode
        s.eval([5])
        assert lib.tova_engine_n_observed(s._engine) == syncs


def test_keep_is_set_before_the_first_decode_only(tiny_path):
    from tova_cpp._ffi import ffi, lib

    with Session(tiny_path, budget=8, chunk=4, keep=2, n_threads=2) as s:
        assert lib.tova_engine_set_keep(s._engine, 8) == -1  # keep >= budget: TOVA_ERR_ARG, no crash
        assert "keep" in ffi.string(lib.tova_engine_last_error(s._engine)).decode()
        s.eval([1, 2, 3])
        assert lib.tova_engine_set_keep(s._engine, 3) == -3  # TOVA_ERR_STATE while tokens are held
        s.reset()
        assert lib.tova_engine_set_keep(s._engine, 3) == 0


def _handle(s: Session) -> int:
    from tova_cpp.session import _handle_id

    return _handle_id(s._model)


def test_shared_models_load_once_and_free_when_the_last_holder_closes(smollm2_path, tiny_path):
    """Inside shared_models(), sessions on the same file and n_gpu_layers share one model and answer as
    sessions with their own; a session outliving the block keeps it until it closes; another file loads its own."""
    from tova_cpp import session as session_mod

    prompt = list(range(1, 40))
    with Session(smollm2_path, budget=16, chunk=8) as alone:
        alone.eval(prompt)
        expect = alone.logits().copy()
    with tova_cpp.shared_models():
        a = Session(smollm2_path, budget=16, chunk=8)
        with tova_cpp.shared_models():  # nested: same pool
            b = Session(smollm2_path, budget=16, policy="h2o", chunk=8)
        c = Session(tiny_path, budget=8)
        assert _handle(a) == _handle(b) != _handle(c)
        assert session_mod._SHARED.refs[_handle(a)] == 3  # the block's hold + a + b
        a.eval(prompt)
        b.eval(prompt)
        np.testing.assert_array_equal(a.logits(), expect)
        a.close()
        c.close()
        assert session_mod._SHARED.refs[_handle(b)] == 2
    assert session_mod._SHARED.refs == {_handle(b): 1}  # the block is gone, b still holds the model
    b.reset()
    b.eval(prompt)
    assert b.logits().shape == expect.shape
    b.close()
    assert session_mod._SHARED.refs == {} and session_mod._SHARED.by_key == {}
    with Session(smollm2_path, budget=16, chunk=8) as d:  # outside any block: its own model again
        assert _handle(d) not in session_mod._SHARED.refs


def test_llama_cpp_errors_print_without_verbose(tiny_path, tmp_path, capsys):
    """llama.cpp's error lines reach stderr with verbose off (llama-cpp-python 0.3.36's own callback reads ggml's
    ERROR level as DEBUG and drops it: a CUDA failure printed only ggml's abort line); its info lines print only
    with verbose on."""
    import llama_cpp

    from tova_cpp import session as session_mod

    session_mod._set_verbose(False)
    with Session(tiny_path, budget=8, n_threads=1):
        pass
    assert "print_info" not in capsys.readouterr().err
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(tiny_path.read_bytes()[:4096])
    assert not llama_cpp.llama_model_load_from_file(str(bad).encode(), llama_cpp.llama_model_default_params())
    err = capsys.readouterr().err
    assert "error loading model" in err
    with Session(tiny_path, budget=8, n_threads=1, verbose=True):
        pass
    assert "print_info" in capsys.readouterr().err
    session_mod._set_verbose(False)
