"""Sliding-window (iSWA) models: Gemma 2/3 with the policy on the full-attention layers and llama.cpp's window
on the sliding-window layers. The NumPy oracle is first checked against plain llama.cpp (full cache) on tiny
random Gemma GGUFs, then the engine against the oracle, then the real gemma3-270m against plain
llama-cpp-python."""

from __future__ import annotations

import dataclasses

import llama_cpp
import numpy as np
import pytest
from reference import Reference
from tiny_gguf import write_tiny_iswa

from tova_cpp import Session
from tova_cpp._ffi import lib

# the oracle's GELU emulates ggml's f16 table; an f32 input that rounds to the neighbouring f16 moves one
# activation by an f16 step: logits agree to ~3e-4 of their largest magnitude
GEMMA_RTOL = 1e-3
GEMMA_CASES = {
    "gemma3": {"arch": "gemma3"},
    "gemma2": {"arch": "gemma2", "attn_softcap": 5.0, "final_softcap": 3.0},
}
ARCHS = [*GEMMA_CASES, "gpt-oss"]


@pytest.fixture(scope="module")
def gemmas(tmp_path_factory):
    """arch -> (path, model): 4 layers, sliding-window pattern 2 (layers 1 and 3 full), window 8; gemma3,
    gemma2 (softcaps) and gpt-oss (attention sinks, mixture of experts)."""
    out = {}
    for arch, kw in GEMMA_CASES.items():
        path = tmp_path_factory.mktemp("tiny-gemma") / f"tiny-{arch}-f32.gguf"
        out[arch] = (path, write_tiny_iswa(path, **kw))
    path = tmp_path_factory.mktemp("tiny-gpt-oss") / "tiny-gpt-oss-f32.gguf"
    out["gpt-oss"] = (path, write_tiny_iswa(path, "gpt-oss"))
    return out


def llama_cpp_logits(path, tokens) -> np.ndarray:
    """Every token's logits from plain llama.cpp (full cache, F32 K/V, flash attention off)."""
    llm = llama_cpp.Llama(
        str(path),
        n_ctx=256,
        n_batch=256,
        logits_all=True,
        type_k=0,
        type_v=0,
        flash_attn=False,
        n_threads=2,
        verbose=False,
    )
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)])
    finally:
        llm.close()


def oracle_error(model, tokens, logits) -> float:
    """Largest logit difference of the oracle (full cache) over all steps, relative to the logits' scale."""
    ref = Reference(model, budget=10**6, chunk=8)
    worst = 0.0
    for tok, want in zip(tokens, logits, strict=True):
        ref.eval([tok])
        worst = max(worst, float(np.abs(ref.last_logits - want).max() / np.abs(want).max()))
    return worst


@pytest.mark.parametrize("arch", ARCHS)
def test_oracle_matches_llama_cpp(gemmas, arch):
    """The oracle's Gemma (window masks, NEOX RoPE, per-layer RoPE base, q/k norms, GELU, softcaps) and
    gpt-oss (sinks, biases, experts) are llama.cpp's: 60 tokens, 7.5 windows of 8."""
    path, model = gemmas[arch]
    tokens = np.random.default_rng(0).integers(0, model.n_vocab, size=60).tolist()
    assert oracle_error(model, tokens, llama_cpp_logits(path, tokens)) < GEMMA_RTOL


@pytest.mark.parametrize(
    "arch, change",
    [
        ("gemma3", {"n_swa": 10**6}),
        ("gemma3", {"swa_pattern": 1}),
        ("gemma3", {"rope_base_swa": 1e6}),
        ("gemma2", {"n_swa": 10**6}),
        ("gemma2", {"attn_softcap": 0.0}),
        ("gemma2", {"final_softcap": 0.0}),
        ("gpt-oss", {"n_swa": 10**6}),
        ("gpt-oss", "no-sinks"),
    ],
    ids=[
        "no-window",
        "every-layer-full",
        "one-rope-base",
        "gemma2-no-window",
        "no-attn-softcap",
        "no-final-softcap",
        "gpt-oss-no-window",
        "no-sinks",
    ],
)
def test_oracle_without_a_feature_fails(gemmas, arch, change):
    """Each feature the oracle models is visible in the comparison above: dropping it fails it."""
    path, model = gemmas[arch]
    tokens = np.random.default_rng(0).integers(0, model.n_vocab, size=60).tolist()
    if change == "no-sinks":  # a sink logit of -1e30 adds nothing to the denominator
        weights = {k: np.full_like(v, -1e30) if "sinks" in k else v for k, v in model.weights.items()}
        wrong = dataclasses.replace(model, weights=weights)
    else:
        wrong = dataclasses.replace(model, **change)
    assert oracle_error(wrong, tokens, llama_cpp_logits(path, tokens)) > 10 * GEMMA_RTOL


# -- the engine on tiny iSWA models against the oracle ------------------------------------------------------

BUDGET, CHUNK, STEPS = 16, 8, 40


def compare(
    s: Session, ref: Reference, prompt, stream, rtol=GEMMA_RTOL, max_ties=0, tie_rtol=5e-2
) -> str | None:
    """Runs both; None if logits and every managed layer's kept positions agree at every step, else a
    message. max_ties > 0 (flash attention): that many layer-cuts may keep another set that is the policy's up
    to a near tie (tie_rtol) by the oracle's scores (the oracle then follows)."""
    ties = 0
    for step, tokens in enumerate([prompt] + [[t] for t in stream]):
        s.eval(tokens)
        ref.eval(tokens)
        kept, want = s.kept_positions(), ref.kept_positions()
        if kept.shape != want.shape or not np.array_equal(kept, want):
            if max_ties == 0 or ref.before_cut is None:
                return f"step {step}: kept positions differ\nengine {kept}\nreference {want}"
            try:
                ties += ref.follow(kept, rtol=tie_rtol)
            except AssertionError as e:
                return f"step {step}: kept positions differ ({e})"
            if ties > max_ties:
                return f"step {step}: kept positions differ in more than {max_ties} near-tie cuts"
        err = np.abs(s.logits() - ref.last_logits).max() / np.abs(ref.last_logits).max()
        if err > rtol:
            return f"step {step}: logits differ by {err:.3g} of their scale"
        assert s.n_occupied <= s.budget + s.evict_interval - 1 or s.policy == "full"
        assert s.pos_window()[1] == s.n_past - 1
    return None


def tiny_session(path, budget=BUDGET, **kw) -> Session:
    return Session(path, budget=budget, chunk=CHUNK, type_k="f32", type_v="f32", n_threads=2, **kw)


# (policy, keyword args, flash attention): one line per case
SWA_CASES = [
    ("tova", {}, False),
    ("tova", {}, True),
    ("window", {}, False),
    ("sink", {}, False),
    ("h2o", {}, False),
    ("tova", {"keep": 3}, False),
    ("tova", {"evict_interval": 4}, False),
]


@pytest.mark.parametrize(
    "case", SWA_CASES, ids=lambda c: "-".join([c[0], *map(str, c[1].values()), f"fa{int(c[2])}"])
)
@pytest.mark.parametrize("prompt_len", [10, 50], ids=["prompt<budget", "chunked"])
@pytest.mark.parametrize("arch", ARCHS)
def test_engine_matches_oracle_on_iswa(gemmas, arch, case, prompt_len):
    """The policy on the full-attention layers, llama.cpp's window on the others: logits and kept positions of
    every full-attention layer equal the oracle's at every step (gemma2: softcapped scores)."""
    policy, kw, flash_attn = case
    path, model = gemmas[arch]
    tokens = np.random.default_rng(prompt_len).integers(0, model.n_vocab, size=prompt_len + STEPS).tolist()
    with tiny_session(path, policy=policy, flash_attn=flash_attn, **kw) as s:
        assert s.managed_layers == model.full_layers == [1, 3]
        ref = Reference(model, BUDGET, CHUNK, policy, **kw)
        # flash attention casts the F32 cache to F16 inside the kernel: logits move by ~1e-3
        rtol = 2e-2 if flash_attn else GEMMA_RTOL
        msg = compare(s, ref, tokens[:prompt_len], tokens[prompt_len:], rtol=rtol, max_ties=3 * flash_attn)
    assert msg is None


def test_budget_at_the_window_rule(gemmas):
    """budget = n_swa - 1, the smallest the rule allows, still gives the oracle's logits with the ideal window."""
    path, model = gemmas["gemma3"]
    tokens = np.random.default_rng(1).integers(0, model.n_vocab, size=60).tolist()
    budget = model.n_swa - 1
    with Session(path, budget=budget, chunk=4, type_k="f32", type_v="f32", n_threads=2) as s:
        assert compare(s, Reference(model, budget, 4), tokens[:5], tokens[5:]) is None


def test_budget_below_the_window_is_refused(gemmas):
    path, model = gemmas["gemma3"]
    with pytest.raises(ValueError, match=f"budget must be at least {model.n_swa - 1}"):
        Session(path, budget=model.n_swa - 2)
    with Session(path, budget=model.n_swa - 2, policy="full", chunk=64) as s:  # no cut: no rule
        s.eval(list(range(20)))


def test_budget_below_the_window_breaks_the_sliding_layers(gemmas, monkeypatch):
    """The rule is tight: with the check lifted, budget = n_swa - 2 frees a position a sliding-window layer still
    attends to and the logits leave the oracle's."""
    import tova_cpp.session

    monkeypatch.setattr(tova_cpp.session, "swa_min_budget", lambda n_swa: 0)
    path, model = gemmas["gemma3"]
    tokens = np.random.default_rng(1).integers(0, model.n_vocab, size=60).tolist()
    budget = model.n_swa - 2
    with Session(path, budget=budget, chunk=4, type_k="f32", type_v="f32", n_threads=2) as s:
        msg = compare(s, Reference(model, budget, 4), tokens[:5], tokens[5:])
    assert msg is not None and "logits differ" in msg


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"arch": "gemma3", "swa_pattern": 0}, "every layer"),  # pattern 0: every layer slides
        (
            {"arch": "gemma2", "attn_softcap": 5.0},
            r"manages the full-attention layers of \['gemma3', 'gpt-oss'\]",
        ),
    ],
    ids=["all-sliding", "unknown-architecture"],
)
def test_unmanageable_swa_models_are_refused(tmp_path, monkeypatch, kw, match):
    import tova_cpp.session
    from tova_cpp import UnsupportedModelError

    # an architecture whose default pattern tova_cpp does not know: gemma2 with its entry removed
    monkeypatch.delitem(tova_cpp.session.SWA_PATTERNS, "gemma2")
    path = tmp_path / "tiny.gguf"
    write_tiny_iswa(path, write_pattern=kw["arch"] == "gemma3", **kw)
    with pytest.raises(UnsupportedModelError, match=match):
        Session(path, budget=16)


def test_pattern_array_is_read(tmp_path):
    """{arch}.attention.sliding_window_pattern as one bool per layer (which llama.cpp's metadata API does not
    return) decides the managed layers, as it decides llama.cpp's."""
    path = tmp_path / "tiny.gguf"
    model = write_tiny_iswa(path, pattern_array=True)  # layers 1 and 3 full; gemma3's default would be none
    tokens = np.random.default_rng(2).integers(0, model.n_vocab, size=40).tolist()
    with tiny_session(path, policy="tova") as s:
        assert s.managed_layers == [1, 3]
        assert compare(s, Reference(model, BUDGET, CHUNK), tokens[:20], tokens[20:]) is None


def test_wrong_layer_pattern_is_caught(tmp_path, monkeypatch):
    """A pattern that disagrees with llama.cpp's puts a managed layer in the sliding-window cache: the engine
    sees the shared cache buffer at the first decode and refuses to go on."""
    import tova_cpp.session
    from tova_cpp import EngineError

    path = tmp_path / "tiny.gguf"
    write_tiny_iswa(path, n_layer=6, write_pattern=False)  # llama.cpp's gemma3 default: only layer 5 full
    monkeypatch.setitem(tova_cpp.session.SWA_PATTERNS, "gemma3", 2)  # we would manage 1, 3, 5
    with tiny_session(path) as s:
        assert s.managed_layers == [1, 3, 5]
        with pytest.raises(EngineError, match="sliding-window layer pattern is wrong"):
            s.eval([1, 2, 3])


# -- the real gemma3-270m ------------------------------------------------------------------------------------

TEXT = (
    "The sliding-window layers of Gemma keep only the last few hundred tokens; its full-attention layers keep "
    "everything, and that is where the memory of a long conversation goes. "
)


def test_gemma3_budget_above_the_text_is_plain_llama_cpp(gemma3_path):
    """No cut happens: every logit equals plain llama-cpp-python's, bit for bit (same n_ctx, n_batch,
    threads, f16 cache, flash attention off)."""
    with Session(gemma3_path, budget=600, chunk=32, n_threads=2) as s:
        assert s.managed_layers == [5, 11, 17] and s.n_swa == 512
        prompt = s.tokenize(TEXT * 3)
        llm = llama_cpp.Llama(
            str(gemma3_path),
            n_ctx=s.n_cells,
            n_batch=32,
            n_ubatch=32,
            n_threads=2,
            flash_attn=False,
            verbose=False,
        )
        try:
            s.eval(prompt)
            llm.eval(prompt)
            tok = int(np.argmax(s.logits()))
            for _ in range(24):
                plain = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(s.n_vocab,))
                assert np.array_equal(s.logits(), plain)
                s.eval([tok])
                llm.eval([tok])
                tok = int(np.argmax(s.logits()))
        finally:
            llm.close()


@pytest.mark.parametrize(
    "policy, flash_attn",
    [("tova", False), ("tova", True), ("window", False)],
    ids=["tova", "tova-fa", "window"],
)
def test_gemma3_full_attention_layers_stay_bounded(gemma3_path, policy, flash_attn):
    """Over a generation past twice the budget, the full-attention layers never hold more than the budget,
    each keeps unique positions at most the newest (window: exactly the newest `budget`)."""
    budget, chunk = 512, 32
    with Session(
        gemma3_path, budget=budget, chunk=chunk, policy=policy, flash_attn=flash_attn, n_threads=2
    ) as s:
        prompt = s.tokenize(TEXT * 30)[: budget + 100]
        assert len(prompt) == budget + 100
        s.eval(prompt)
        tok = int(np.argmax(s.logits()))
        for _ in range(budget):
            s.eval([tok])
            assert s.n_occupied == budget
            kept = s.kept_positions()
            assert kept.shape == (3, budget)
            assert all(np.unique(row).size == budget for row in kept)
            assert kept.max() <= s.n_past - 1
            if policy == "window":
                assert (kept == np.arange(s.n_past - budget, s.n_past)).all()
            tok = int(np.argmax(s.logits()))
        assert s.n_past > 2 * budget


@pytest.mark.parametrize("flash_attn", [False, True], ids=["fa-off", "fa-on"])
def test_only_full_attention_layers_are_read(gemmas, flash_attn):
    """tova reads one node per managed layer in a scored decode (each costs a sync), none of the sliding ones."""
    path, model = gemmas["gemma3"]
    with tiny_session(path, policy="tova", flash_attn=flash_attn) as s:
        s.eval(list(range(BUDGET)))
        s.eval([1])  # the decode that fills budget + 1 cells: scored, then cut
        assert s.n_occupied == BUDGET
        assert lib.tova_engine_n_observed(s._engine) == len(model.full_layers)


@pytest.mark.parametrize("flash_attn", [False, True], ids=["fa-off", "fa-on"])
def test_scores_without_the_sink_fail_the_comparison(gemmas, flash_attn):
    """The sinks change tova's choices on the tiny gpt-oss: an oracle that leaves them out of the scores'
    denominator disagrees with the engine, with flash attention off (llama.cpp's own softmax) and on (the
    scoring graph adds them)."""
    path, model = gemmas["gpt-oss"]
    tokens = np.random.default_rng(50).integers(0, model.n_vocab, size=50 + STEPS).tolist()
    with tiny_session(path, policy="tova", flash_attn=flash_attn) as s:
        ref = Reference(model, BUDGET, CHUNK, "no_sink_scores")
        msg = compare(s, ref, tokens[:50], tokens[50:], rtol=2e-2, max_ties=3 * flash_attn)
    assert msg is not None and "kept positions differ" in msg


@pytest.mark.parametrize("flash_attn", [False, True], ids=["fa-off", "fa-on"])
def test_scores_without_the_softcap_fail_the_comparison(gemmas, flash_attn):
    """Gemma 2's attention softcap changes tova's choices on the tiny gemma2: an oracle that scores the logits
    before the cap disagrees with the engine, with flash attention off (llama.cpp's own softmax rows) and on (the
    scoring graph applies the cap from the node's op_params)."""
    path, model = gemmas["gemma2"]
    assert model.attn_softcap
    tokens = np.random.default_rng(50).integers(0, model.n_vocab, size=50 + STEPS).tolist()
    with tiny_session(path, policy="tova", flash_attn=flash_attn) as s:
        ref = Reference(model, BUDGET, CHUNK, "no_softcap_scores")
        msg = compare(s, ref, tokens[:50], tokens[50:], rtol=2e-2, max_ties=3 * flash_attn)
    assert msg is not None and "kept positions differ" in msg
