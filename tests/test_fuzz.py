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
            ref.follow(kept, rtol=5e-2)
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
