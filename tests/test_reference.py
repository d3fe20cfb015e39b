"""The engine against the NumPy oracle on a tiny random F32 model: logits and per-layer kept positions at
every step, for every policy (and protected prefix) x each way a prompt can arrive x both movers; wrong
policies must fail the same comparison."""

from __future__ import annotations

import numpy as np
import pytest
from reference import Reference
from tiny_gguf import write_tiny_llama

from tova_cpp import Session

BUDGET, CHUNK, STEPS = 16, 8, 200
EXTRA_STEPS = 48  # the baselines: three full turns of a 16-cell budget, to keep CI time modest

# (policy, Session/Reference keyword args, decode steps): adding a policy is adding a line
POLICY_CASES = [
    ("tova", {}, STEPS),
    ("window", {}, EXTRA_STEPS),
    ("sink", {}, EXTRA_STEPS),
    ("h2o", {}, EXTRA_STEPS),
    ("h2o", {"budget": 15}, EXTRA_STEPS),  # odd budget: 8 recent + 7 heavy
    ("tova", {"keep": 5}, EXTRA_STEPS),
    ("tova", {"keep": 12}, EXTRA_STEPS),  # with the 10-token prompt the protected prefix completes while decoding
    ("window", {"keep": 3}, EXTRA_STEPS),
    ("sink", {"keep": 6, "n_sink": 2}, EXTRA_STEPS),
    ("h2o", {"keep": 5}, EXTRA_STEPS),  # 11 unprotected cells: 6 recent + 5 heavy
]


def case_id(case):
    policy, kw, _ = case
    return "-".join([policy] + [f"{k}{v}" for k, v in kw.items()])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama-f32.gguf"
    return path, write_tiny_llama(path)


def session(path, budget=BUDGET, graph_mover=False, **kw):
    s = Session(path, budget=budget, chunk=CHUNK, type_k="f32", type_v="f32", n_threads=2, **kw)
    s.set_force_graph_mover(graph_mover)
    return s


def first_mismatch(s: Session, ref: Reference, prompt, stream):
    """Runs both; returns None if logits (rtol 1e-4) and kept positions agree at every step, else a message."""
    for step, tokens in enumerate([prompt] + [[t] for t in stream]):
        s.eval(tokens)
        ref.eval(tokens)
        kept = s.kept_positions()
        want = ref.kept_positions()
        if kept.shape[1] != want.shape[1] or not np.array_equal(kept, want):
            return f"step {step}: kept positions differ\nengine {kept}\nreference {want}"
        logits, ref_logits = s.logits(), ref.last_logits
        tol = 1e-4 * np.abs(ref_logits).max()
        if not np.allclose(logits, ref_logits, rtol=1e-4, atol=tol):
            return f"step {step}: logits differ by {np.abs(logits - ref_logits).max()}"
        assert s.n_occupied <= s.budget
        assert s.pos_window() == (s.n_past - s.n_occupied, s.n_past - 1)
        protected = np.arange(min(s.keep, s.n_past))
        assert all(np.isin(protected, row).all() for row in kept)  # never evicted, in any layer
    return None


@pytest.mark.parametrize("case", POLICY_CASES, ids=case_id)
@pytest.mark.parametrize("prompt_len", [10, 20, 50], ids=["prompt<budget", "budget<prompt<=memory", "chunked"])
@pytest.mark.parametrize("graph_mover", [False, True], ids=["memcpy", "graph"])
def test_engine_matches_reference(tiny, case, prompt_len, graph_mover):
    policy, kw, steps = case
    kw = dict(kw)
    budget = kw.pop("budget", BUDGET)
    path, model = tiny
    rng = np.random.default_rng(prompt_len)
    tokens = rng.integers(0, model.n_vocab, size=prompt_len + steps).tolist()
    ref = Reference(model, budget, CHUNK, policy, **kw)
    with session(path, budget=budget, graph_mover=graph_mover, policy=policy, **kw) as s:
        assert first_mismatch(s, ref, tokens[:prompt_len], tokens[prompt_len:]) is None


@pytest.mark.parametrize(
    "policy, kw, variant, ref_kw",
    [
        ("tova", {}, "shared", {}),
        ("tova", {}, "protect_newest", {}),
        ("h2o", {}, "h2o_last_row", {}),  # the prompt piece's accumulation must count every query row
        ("h2o", {}, "window", {}),
        ("sink", {}, "window", {}),  # the sinks matter
        ("tova", {"keep": 4}, "tova", {}),  # the protected prefix matters
        ("window", {}, "window", {"keep": 4}),  # ... and is off by default
    ],
    ids=["tova-vs-shared", "tova-vs-protect_newest", "h2o-vs-last_row", "h2o-vs-window", "sink-vs-window",
         "keep-vs-none", "none-vs-keep"],
)
def test_wrong_policies_fail_the_comparison(tiny, policy, kw, variant, ref_kw):
    path, model = tiny
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, model.n_vocab, size=20 + STEPS).tolist()
    with session(path, policy=policy, **kw) as s:
        msg = first_mismatch(s, Reference(model, BUDGET, CHUNK, variant, **ref_kw), tokens[:20], tokens[20:])
    assert msg is not None and "differ" in msg


def test_budget_above_every_token_is_the_full_model(tiny):
    path, model = tiny
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, model.n_vocab, size=100).tolist()
    with Session(path, budget=128, chunk=CHUNK, type_k="f32", type_v="f32", n_threads=2) as s:
        ref = Reference(model, 128, CHUNK)
        for t in [tokens[:30]] + [[t] for t in tokens[30:]]:
            s.eval(t)
            ref.eval(t)
            np.testing.assert_allclose(s.logits(), ref.last_logits, rtol=1e-4,
                                       atol=1e-4 * np.abs(ref.last_logits).max())
        assert s.n_occupied == 100


@pytest.mark.parametrize(
    "key, value, match",
    [("llama.attention.max_alibi_bias", 8.0, "ALiBi"), ("llama.attention.kv_lora_rank", 16, "latent attention")],
)
def test_alibi_and_mla_metadata_are_refused(tmp_path, key, value, match):
    from tova_cpp import UnsupportedModelError

    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, extra={key: value})
    with pytest.raises(UnsupportedModelError, match=match):
        Session(path, budget=8)
