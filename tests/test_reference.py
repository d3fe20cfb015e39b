"""The engine against the NumPy oracle on a tiny random F32 model: logits and per-layer kept positions at
every step, for every policy (and protected prefix) x each way a prompt can arrive x both movers, with flash
attention off and on, cutting every step or every m steps, with F32 and quantized caches; wrong policies must
fail the same comparison. (GPU: test_gpu.py.)"""

from __future__ import annotations

import llama_cpp
import numpy as np
import pytest
from reference import Reference
from tiny_gguf import write_tiny_llama, write_tiny_recurrent

from tova_cpp import Session

BUDGET, CHUNK, STEPS = 16, 8, 200
EXTRA_STEPS = 48  # the baselines: three full turns of a 16-cell budget, to keep CI time modest
# flash attention casts the F32 cache to F16 inside the kernel: logits move by ~1e-3 relative
RTOL = {False: 1e-4, True: 2e-2}

# (policy, Session/Reference keyword args, decode steps, flash attention): adding a policy is adding a line
POLICY_CASES = [
    ("tova", {}, STEPS, False),
    ("tova", {}, STEPS, True),
    ("window", {}, EXTRA_STEPS, False),
    (
        "window",
        {},
        EXTRA_STEPS,
        True,
    ),  # window/sink capture nothing: flash attention changes nothing for them
    ("sink", {}, EXTRA_STEPS, False),
    ("h2o", {}, EXTRA_STEPS, False),
    ("h2o", {"budget": 15}, EXTRA_STEPS, False),  # odd budget: 8 recent + 7 heavy
    ("tova", {"keep": 5}, EXTRA_STEPS, False),
    ("tova", {"keep": 5}, EXTRA_STEPS, True),
    (
        "tova",
        {"keep": 12},
        EXTRA_STEPS,
        False,
    ),  # with the 10-token prompt the prefix completes while decoding
    ("window", {"keep": 3}, EXTRA_STEPS, False),
    ("sink", {"keep": 6, "n_sink": 2}, EXTRA_STEPS, False),
    ("sink", {"keep": 6, "n_sink": 2}, EXTRA_STEPS, True),
    ("h2o", {"keep": 5}, EXTRA_STEPS, False),  # 11 unprotected cells: 6 recent + 5 heavy
]


def case_id(case):
    policy, kw, _, fa = case
    return "-".join([policy] + [f"{k}{v}" for k, v in kw.items()] + ["fa-on" if fa else "fa-off"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama-f32.gguf"
    return path, write_tiny_llama(path)


def session(
    path,
    budget=BUDGET,
    graph_mover=False,
    flash_attn=False,
    evict_interval=1,
    type_k="f32",
    type_v="f32",
    **kw,
):
    s = Session(
        path,
        budget=budget,
        chunk=CHUNK,
        type_k=type_k,
        type_v=type_v,
        n_threads=2,
        flash_attn=flash_attn,
        evict_interval=evict_interval,
        **kw,
    )
    s.set_force_graph_mover(graph_mover)
    return s


def first_mismatch(
    s: Session,
    ref: Reference,
    prompt,
    stream,
    max_ties: int = 0,
    rtol: float | None = None,
    tie_rtol: float = 5e-2,
):
    """Runs both; returns None if logits (rtol 1e-4, 2e-2 with flash attention) and kept positions agree at
    every step, else a message. max_ties > 0 (flash attention: F16 K/V inside the kernel move scores by ~1e-3):
    up to that many layer-cuts may keep another set when it is TOVA's up to a 5% near tie by the reference's
    own scores; the reference then follows the engine's choice."""
    rtol = RTOL[s.flash_attn] if rtol is None else rtol
    ties = 0
    for step, tokens in enumerate([prompt] + [[t] for t in stream]):
        s.eval(tokens)
        ref.eval(tokens)
        kept = s.kept_positions()
        want = ref.kept_positions()
        if kept.shape[1] != want.shape[1] or not np.array_equal(kept, want):
            if max_ties == 0 or ref.before_cut is None:
                return f"step {step}: kept positions differ\nengine {kept}\nreference {want}"
            try:
                ties += ref.follow(kept, rtol=tie_rtol)
            except AssertionError as e:
                return f"step {step}: kept positions differ ({e})\nengine {kept}\nreference {want}"
            if ties > max_ties:
                return f"step {step}: kept positions differ in more than {max_ties} near-tie cuts"
        logits, ref_logits = s.logits(), ref.last_logits
        tol = rtol * np.abs(ref_logits).max()
        if not np.allclose(logits, ref_logits, rtol=rtol, atol=tol):
            return f"step {step}: logits differ by {np.abs(logits - ref_logits).max()}"
        assert s.n_occupied <= s.budget + s.evict_interval - 1
        assert s.pos_window() == (s.n_past - s.n_occupied, s.n_past - 1)
        protected = np.arange(min(s.keep, s.n_past))
        assert all(np.isin(protected, row).all() for row in kept)  # never evicted, in any layer
    return None


@pytest.mark.parametrize("case", POLICY_CASES, ids=case_id)
@pytest.mark.parametrize(
    "prompt_len", [10, 20, 50], ids=["prompt<budget", "budget<prompt<=memory", "chunked"]
)
@pytest.mark.parametrize("graph_mover", [False, True], ids=["memcpy", "graph"])
def test_engine_matches_reference(tiny, case, prompt_len, graph_mover):
    policy, kw, steps, flash_attn = case
    kw = dict(kw)
    budget = kw.pop("budget", BUDGET)
    path, model = tiny
    rng = np.random.default_rng(prompt_len)
    tokens = rng.integers(0, model.n_vocab, size=prompt_len + steps).tolist()
    ref = Reference(model, budget, CHUNK, policy, **kw)
    with session(
        path, budget=budget, graph_mover=graph_mover, flash_attn=flash_attn, policy=policy, **kw
    ) as s:
        msg = first_mismatch(
            s, ref, tokens[:prompt_len], tokens[prompt_len:], max_ties=3 * flash_attn, rtol=RTOL[flash_attn]
        )
        assert msg is None


@pytest.mark.parametrize("flash_attn", [False, True], ids=["fa-off", "fa-on"])
def test_unscored_decodes_run_without_the_callback(tiny, flash_attn, monkeypatch):
    """With the device paths (cells predicted, not read from the graph), tova's decodes that no cut follows run
    with the eval callback switched off on the context's scheduler and the scored ones with it back on: the
    oracle still agrees at every step, and TOVA_KEEP_CALLBACK=1 (callback on throughout) gives the same logits."""
    path, model = tiny
    m = 4
    tokens = np.random.default_rng(3).integers(0, model.n_vocab, size=20 + EXTRA_STEPS).tolist()
    logits = {}
    for keep in ("0", "1"):
        monkeypatch.setenv("TOVA_KEEP_CALLBACK", keep)
        with session(path, graph_mover=True, flash_attn=flash_attn, evict_interval=m) as s:
            ref = Reference(model, BUDGET, CHUNK, evict_interval=m)
            assert first_mismatch(s, ref, tokens[:20], tokens[20:], max_ties=3 * flash_attn) is None
            st = s.engine_stats()
            logits[keep] = s.logits()
        unscored = st["decodes"] - st["scored_decodes"]
        if keep == "0":
            # the prompt's decodes need the callback (cache tensors not yet known, or cells not predicted)
            assert unscored - 3 <= st["plain_decodes"] <= unscored and st["plain_decodes"] > EXTRA_STEPS // 2
        else:
            assert st["plain_decodes"] == 0
    np.testing.assert_array_equal(logits["0"], logits["1"])


def test_flash_attention_scores_all_layers_in_one_graph(tmp_path):
    """With flash attention the newest query's scores are recomputed for every layer by one graph whose node
    count does not grow with the layers (one 4-D product over the equally spaced K caches), and they agree with
    the oracle on a 6-layer model too."""
    per_decode = {}
    for n_layer in (2, 6):
        path = tmp_path / f"tiny-{n_layer}.gguf"
        model = write_tiny_llama(path, n_layer=n_layer)
        tokens = np.random.default_rng(n_layer).integers(0, model.n_vocab, size=20 + EXTRA_STEPS).tolist()
        with session(path, flash_attn=True) as s:
            ref = Reference(model, BUDGET, CHUNK)
            assert first_mismatch(s, ref, tokens[:20], tokens[20:], max_ties=3) is None
            st = s.engine_stats()
        assert st["scored_decodes"] >= EXTRA_STEPS
        per_decode[n_layer] = st["score_nodes"] / st["scored_decodes"]
    assert per_decode[2] == per_decode[6] <= 16, per_decode


def test_h2o_refuses_flash_attention(tiny):
    with pytest.raises(ValueError, match="h2o needs flash_attn=False"):
        Session(tiny[0], budget=BUDGET, policy="h2o", flash_attn=True)


@pytest.fixture(scope="module")
def tiny128(tmp_path_factory):
    """head_dim 32: one quantization block per head, as q8_0/q4_0 caches need."""
    path = tmp_path_factory.mktemp("tiny128") / "tiny-llama-128-f32.gguf"
    return path, write_tiny_llama(path, n_embd=128)


@pytest.mark.parametrize(
    "type_k, type_v, flash_attn, graph_mover, evict_interval",
    [
        ("q8_0", "q8_0", True, False, 1),
        ("q4_0", "q4_0", True, False, 1),
        ("q4_0", "q4_0", True, True, 1),
        ("q8_0", "q8_0", True, True, 4),
        ("f16", "q8_0", True, False, 1),
    ],
    ids=lambda v: str(v),
)
@pytest.mark.parametrize("prompt_len", [20, 50], ids=["budget<prompt<=memory", "chunked"])
def test_quantized_cache_matches_reference(
    tiny128, type_k, type_v, flash_attn, graph_mover, evict_interval, prompt_len
):
    """Quantized rows are moved as raw bytes and scored as stored: the same kept sets as an oracle that rounds
    K/V as the cache stores them (logits within 2e-2: llama.cpp's summation order and f16 steps differ)."""
    path, model = tiny128
    rng = np.random.default_rng(prompt_len)
    tokens = rng.integers(0, model.n_vocab, size=prompt_len + STEPS).tolist()
    with session(
        path,
        graph_mover=graph_mover,
        flash_attn=flash_attn,
        evict_interval=evict_interval,
        type_k=type_k,
        type_v=type_v,
    ) as s:
        ref = Reference(model, BUDGET, CHUNK, evict_interval=evict_interval, type_k=type_k, type_v=type_v)
        assert first_mismatch(s, ref, tokens[:prompt_len], tokens[prompt_len:], max_ties=3, rtol=2e-2) is None


def test_quantized_reference_is_not_the_f32_one(tiny128):
    """The rounding the oracle emulates matters: the f32 oracle disagrees with a q4_0 cache."""
    path, model = tiny128
    tokens = np.random.default_rng(20).integers(0, model.n_vocab, size=20 + STEPS).tolist()
    with session(path, flash_attn=True, type_k="q4_0", type_v="q4_0") as s:
        msg = first_mismatch(
            s, Reference(model, BUDGET, CHUNK), tokens[:20], tokens[20:], max_ties=3, rtol=2e-2
        )
    assert msg is not None and "differ" in msg


@pytest.mark.parametrize("evict_interval", [2, 5, 12], ids=lambda m: f"m={m}")
@pytest.mark.parametrize("flash_attn", [False, True], ids=["fa-off", "fa-on"])
def test_evict_interval_matches_reference(tiny, evict_interval, flash_attn):
    path, model = tiny
    rng = np.random.default_rng(evict_interval)
    tokens = rng.integers(0, model.n_vocab, size=50 + STEPS).tolist()
    with session(path, flash_attn=flash_attn, evict_interval=evict_interval) as s:
        assert s.memory == BUDGET + max(CHUNK, evict_interval)
        ref = Reference(model, BUDGET, CHUNK, evict_interval=evict_interval)
        assert first_mismatch(s, ref, tokens[:50], tokens[50:], max_ties=3 * flash_attn) is None
        # from any point: the cache grows to budget + m - 1, then the m-th token brings it back to budget
        while s.n_occupied != BUDGET:
            s.eval([1])
        for i in range(1, evict_interval):
            s.eval([1])
            assert s.n_occupied == BUDGET + i
        s.eval([1])
        assert s.n_occupied == BUDGET


def test_evict_interval_differs_from_per_token_tova(tiny):
    """The m-step reference is not the per-token one: the comparison above can fail."""
    path, model = tiny
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, model.n_vocab, size=20 + STEPS).tolist()
    with session(path, evict_interval=5) as s:
        msg = first_mismatch(s, Reference(model, BUDGET, CHUNK, evict_interval=1), tokens[:20], tokens[20:])
    assert msg is not None and "differ" in msg


@pytest.mark.parametrize(
    "policy, kw, variant, ref_kw, flash_attn",
    [
        ("tova", {}, "shared", {}, False),
        ("tova", {}, "shared", {}, True),
        ("tova", {}, "protect_newest", {}, False),
        ("tova", {}, "protect_newest", {}, True),
        ("h2o", {}, "h2o_last_row", {}, False),  # the prompt piece's accumulation must count every query row
        ("h2o", {}, "window", {}, False),
        ("sink", {}, "window", {}, False),  # the sinks matter
        ("tova", {"keep": 4}, "tova", {}, False),  # the protected prefix matters
        ("window", {}, "window", {"keep": 4}, False),  # ... and is off by default
    ],
    ids=[
        "tova-vs-shared",
        "tova-vs-shared-fa-on",
        "tova-vs-protect_newest",
        "tova-vs-protect_newest-fa-on",
        "h2o-vs-last_row",
        "h2o-vs-window",
        "sink-vs-window",
        "keep-vs-none",
        "none-vs-keep",
    ],
)
def test_wrong_policies_fail_the_comparison(tiny, policy, kw, variant, ref_kw, flash_attn):
    path, model = tiny
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, model.n_vocab, size=20 + STEPS).tolist()
    with session(path, flash_attn=flash_attn, policy=policy, **kw) as s:
        ref = Reference(model, BUDGET, CHUNK, variant, **ref_kw)
        msg = first_mismatch(s, ref, tokens[:20], tokens[20:], max_ties=3 * flash_attn, rtol=RTOL[flash_attn])
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
            np.testing.assert_allclose(
                s.logits(), ref.last_logits, rtol=1e-4, atol=1e-4 * np.abs(ref.last_logits).max()
            )
        assert s.n_occupied == 100


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("llama.attention.max_alibi_bias", 8.0, "ALiBi"),
        ("llama.attention.kv_lora_rank", 16, "latent attention"),
    ],
)
def test_alibi_and_mla_metadata_are_refused(tmp_path, key, value, match):
    from tova_cpp import UnsupportedModelError

    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, extra={key: value})
    with pytest.raises(UnsupportedModelError, match=match):
        Session(path, budget=8)


@pytest.mark.parametrize("arch, kind", [("mamba", "recurrent"), ("jamba", "hybrid")])
def test_recurrent_and_hybrid_memories_are_refused(tmp_path, arch, kind):
    """llama.cpp loads both (its own llama_model_is_recurrent / is_hybrid say which); the session refuses them."""
    from tova_cpp import UnsupportedModelError

    path = tmp_path / f"tiny-{arch}.gguf"
    write_tiny_recurrent(path, arch)
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
    assert model
    try:
        assert llama_cpp.llama_model_is_recurrent(model) == (kind == "recurrent")
        assert llama_cpp.llama_model_is_hybrid(model) == (kind == "hybrid")
    finally:
        llama_cpp.llama_model_free(model)
    with pytest.raises(UnsupportedModelError, match=rf"recurrent or hybrid memory \({arch}\)"):
        Session(path, budget=8)


@pytest.mark.parametrize("keep", [0, 3])
def test_reference_follows_h2o_near_ties_by_accumulated_attention(tiny, keep):
    """Reference.follow (the flash-attention and GPU comparisons) judges an h2o cut by h2o's own score: swapping
    the weakest kept heavy key for the evicted one is followed within that near tie and refused below it;
    evicting one of the recent half is always refused."""
    import copy

    _, model = tiny
    ref = Reference(model, BUDGET, CHUNK, "h2o", keep=keep)
    tokens = np.random.default_rng(9).integers(0, model.n_vocab, size=BUDGET + 1).tolist()
    ref.eval(tokens[:BUDGET])
    ref.eval(tokens[BUDGET:])  # budget + 1 keys: one cut
    _, _, ps, accs, _ = ref.before_cut
    pos, acc, kept = ps[0], accs[0], ref.kept_positions()
    evicted = int(np.setdiff1d(pos, kept[0])[0])
    unprotected = np.sort(pos[pos >= keep])[::-1]
    room = BUDGET - int((pos < keep).sum())
    recent, heavy = unprotected[: room - room // 2], np.setdiff1d(unprotected[room - room // 2 :], [evicted])
    weakest = int(heavy[np.argmin([acc[pos == p][0] for p in heavy])])
    ratio = acc[pos == weakest][0] / acc[pos == evicted][0]
    assert ratio > 1

    def swapped(out_pos):
        other = kept.copy()
        other[0] = np.sort(np.where(kept[0] == out_pos, evicted, kept[0]))
        return other

    assert copy.deepcopy(ref).follow(swapped(weakest), rtol=(ratio - 1) * 1.01) == 1
    with pytest.raises(AssertionError, match="beyond a near tie"):
        copy.deepcopy(ref).follow(swapped(weakest), rtol=(ratio - 1) * 0.5)
    with pytest.raises(AssertionError, match="recent key"):
        copy.deepcopy(ref).follow(swapped(int(recent[-1])), rtol=1e9)
