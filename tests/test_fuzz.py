"""Fuzzing the engine against the NumPy oracle (tests/reference.py): hypothesis draws a configuration (policy,
budget, chunk, keep, evict_interval, flash attention, cache type) and a sequence of operations (prompts and
decodes of random lengths, resets); after every operation the per-layer kept positions must equal the
oracle's and the logits must agree within test_reference's tolerances.

CI runs a bounded, derandomized search (TOVA_FUZZ_EXAMPLES, default 40 examples); a long run:
    TOVA_FUZZ_EXAMPLES=2000 python -m pytest -q tests/test_fuzz.py
(docs/RELIABILITY.md records one)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from reference import Reference
from tiny_gguf import write_tiny_llama

from tova_cpp import Session

EXAMPLES = int(os.environ.get("TOVA_FUZZ_EXAMPLES", "40"))
# With F16 arithmetic (flash attention casts K, V and Q to F16; an F16 cache) a layer may keep another set than
# the float64 oracle when the swapped cells' oracle scores are within TIE_RTOL of each other. Measured: an
# F16-emulating oracle (Reference with type f16) flipped 136 of 41,937 tova cuts against the float64 one,
# the swapped cells at most 7.3% apart (median 0.6%; scripts/tie_flips.py); docs/RELIABILITY.md, section Fuzzing.
TIE_RTOL = 0.10


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "tiny-llama-f32.gguf"
    return path, write_tiny_llama(path)


@st.composite
def configs(draw):
    policy = draw(st.sampled_from(["tova", "window", "sink", "h2o"]))
    budget = draw(st.integers(5 if policy == "sink" else 2, 24))
    kw = {
        "policy": policy,
        "budget": budget,
        "chunk": draw(st.integers(1, 12)),
        "keep": draw(st.integers(0, min(budget - 1, 6))),
        "evict_interval": draw(st.integers(1, 4)),
        "flash_attn": False if policy == "h2o" else draw(st.booleans()),
        # h2o only with F32: a 1,000-example run found an h2o + F16 cut decided by a 2e-4 relative tie in the
        # accumulated attention
        "cache": "f32" if policy == "h2o" else draw(st.sampled_from(["f32", "f16"])),
    }
    if policy == "sink":
        kw["n_sink"] = draw(st.integers(0, budget - 1))
    return kw


operations = st.lists(
    st.one_of(
        st.tuples(st.just("eval"), st.integers(1, 48)),  # a prompt (or a piece of one)
        st.tuples(st.just("decode"), st.integers(1, 12)),  # that many single-token steps
        st.tuples(st.just("reset"), st.just(0)),
    ),
    min_size=1,
    max_size=8,
)


def reference(model, kw):
    return Reference(
        model,
        kw["budget"],
        kw["chunk"],
        kw["policy"],
        keep=kw["keep"],
        n_sink=kw.get("n_sink", 4),
        evict_interval=kw["evict_interval"],
        type_k=kw["cache"],
        type_v=kw["cache"],
    )


def compare(s: Session, ref: Reference, exact: bool) -> str | None:
    """None when the kept positions and the logits agree; near ties (F16 arithmetic) are followed."""
    kept, want = s.kept_positions(), ref.kept_positions()
    if kept.shape != want.shape or not np.array_equal(kept, want):
        if exact or ref.before_cut is None:
            return f"kept positions differ\nengine {kept}\nreference {want}"
        try:
            ref.follow(kept, rtol=TIE_RTOL)
        except AssertionError as e:
            return f"kept positions differ beyond a near tie ({e})\nengine {kept}\nreference {want}"
    rtol = 1e-4 if exact else 2e-2
    logits, ref_logits = s.logits(), ref.last_logits
    if not np.allclose(logits, ref_logits, rtol=rtol, atol=rtol * np.abs(ref_logits).max()):
        return f"logits differ by {np.abs(logits - ref_logits).max()}"
    lo, hi = s.pos_window()
    if (lo, hi) != (s.n_past - s.n_occupied, s.n_past - 1) or s.n_past != ref.n_past:
        return (
            f"positions: window {(lo, hi)}, n_past {s.n_past} (reference {ref.n_past}), {s.n_occupied} cells"
        )
    return None


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(kw=configs(), ops=operations, seed=st.integers(0, 2**16))
# found by a long run: a near tie flipped (flash attention's F16) in a cut inside one multi-piece eval
@example(
    kw={
        "policy": "tova",
        "budget": 23,
        "chunk": 1,
        "keep": 4,
        "evict_interval": 1,
        "flash_attn": True,
        "cache": "f32",
    },
    ops=[("eval", 1), ("eval", 34)],
    seed=1,
)
# found by a long run: layer 2 keeps position 18 where the oracle keeps 2 (oracle scores 0.002111 vs 0.002162, a
# 2.4% near tie that F16 arithmetic reverses); the tie rule then compared against a protected key's score
@example(
    kw={
        "policy": "tova",
        "budget": 8,
        "chunk": 1,
        "keep": 2,
        "evict_interval": 1,
        "flash_attn": True,
        "cache": "f32",
    },
    ops=[("decode", 12), ("decode", 11)],
    seed=13,
)
def test_random_operation_sequences_match_the_reference(tiny, kw, ops, seed):
    path, model = tiny
    rng = np.random.default_rng(seed)
    exact = kw["cache"] == "f32" and not kw["flash_attn"]
    session_kw = {k: v for k, v in kw.items() if k != "cache"}
    with Session(path, type_k=kw["cache"], type_v=kw["cache"], n_threads=2, **session_kw) as s:
        ref = reference(model, kw)
        for step, (op, n) in enumerate(ops):
            if op == "reset":
                s.reset()
                ref = reference(model, kw)
                assert s.n_past == s.n_occupied == 0 and s.pos_window() == (-1, -1)
                continue
            tokens = rng.integers(0, model.n_vocab, n).tolist()
            while tokens:
                if op == "decode":
                    size = 1
                elif exact:
                    size = len(tokens)  # one eval: its own loop splits the pieces and cuts between them
                else:
                    # F16 arithmetic: a near tie may flip in any cut and the reference can follow only the
                    # last one, so feed the pieces eval would make (room = memory - occupied) one at a time
                    size = s.memory - s.n_occupied
                piece, tokens = tokens[:size], tokens[size:]
                s.eval(piece)
                ref.eval(piece)
                msg = compare(s, ref, exact)
                assert msg is None, f"{kw} op {step} {op} {n} (ops {ops}): {msg}"


def near_tie_case(model):
    """The long run's finding, on the oracle alone: tova, budget 8, keep 2, 23 tokens one at a time. At the
    last cut layer 2 keeps position 2 (score 0.002162) over 18 (0.002111); position 1 (protected) scores
    0.001284."""
    ref = Reference(model, 8, 1, "tova", keep=2)
    for t in np.random.default_rng(13).integers(0, 64, 23).tolist():
        ref.eval([t])
    kept = ref.kept_positions()
    assert 2 in kept[2] and 18 not in kept[2] and ref.before_cut is not None
    return ref, kept


def swapped(kept, layer, out, into):
    kept = kept.copy()
    row = kept[layer]
    row[row == out] = into
    kept[layer] = np.sort(row)
    return kept


def test_follow_judges_a_near_tie_by_unprotected_scores_only(tiny):
    ref, kept = near_tie_case(tiny[1])
    assert ref.follow(swapped(kept, 2, 2, 18), rtol=TIE_RTOL) == 1  # 2.4% apart: followed
    assert 18 in ref.kept_positions()[2] and 2 not in ref.kept_positions()[2]


@pytest.mark.parametrize(
    "out, into, match",
    [
        (1, 18, "protected position was evicted"),  # a protected key is never a tie
        (0, 18, "protected position was evicted"),
        (21, 18, "beyond a near tie"),  # 0.288 vs 0.0021
    ],
)
def test_follow_refuses_what_is_not_a_near_tie(tiny, out, into, match):
    ref, kept = near_tie_case(tiny[1])
    with pytest.raises(AssertionError, match=match):
        ref.follow(swapped(kept, 2, out, into), rtol=TIE_RTOL)


def test_follow_refuses_policies_that_do_not_rank_by_scores(tiny):
    model = tiny[1]
    ref = Reference(model, 4, 1, "window")
    for t in range(6):
        ref.eval([t])
    with pytest.raises(AssertionError, match="no near tie"):
        ref.follow(ref.kept_positions(), rtol=TIE_RTOL)
