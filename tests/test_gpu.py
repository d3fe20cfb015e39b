"""The reference comparison with every layer and the KV cache on a GPU (CUDA or Metal build of llama.cpp):
the mover and the flash-attention scoring graph then run as ggml graphs on the device. Skipped without one."""

from __future__ import annotations

import llama_cpp
import numpy as np
import pytest
from reference import Reference
from test_reference import BUDGET, CHUNK, STEPS, first_mismatch
from test_swa import ARCHS as SWA_ARCHS
from test_swa import BUDGET as SWA_BUDGET
from test_swa import CHUNK as SWA_CHUNK
from test_swa import GEMMA_CASES
from test_swa import STEPS as SWA_STEPS
from test_swa import compare as swa_compare
from tiny_gguf import write_tiny_iswa, write_tiny_llama

from tova_cpp import Session

# CUDA's kernels are not the CPU's: on this sharp tiny model the logits of the plain forward pass (before any
# eviction, policy or not) already differ from the float64 oracle by up to ~0.07 (F32 cache) and ~0.2 (q4_0
# cache, flash attention) out of |logits| ~3 (measured on an H200, docs/CUDA.md). So on a GPU: logits within
# 10% of max|logit|, and a kept set may differ from the oracle's when it is TOVA's up to a 25% near tie by the
# oracle's scores (the oracle then follows). Wrong policies still fail these bounds (test below).
GPU_RTOL, GPU_TIE_RTOL, GPU_MAX_TIES = 0.1, 0.25, 10

pytestmark = pytest.mark.skipif(
    not llama_cpp.llama_supports_gpu_offload(),
    reason="llama-cpp-python was built without a GPU backend (CMAKE_ARGS=-DGGML_CUDA=on or Metal)",
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """head_dim 64: CUDA has flash-attention kernels for it (not for the CPU tests' 16); 2 x 4 heads."""
    path = tmp_path_factory.mktemp("tiny-gpu") / "tiny-llama-256-f32.gguf"
    return path, write_tiny_llama(path, n_embd=256, n_ff=256)


def gpu_mismatch(s, ref, prompt, stream):
    """test_reference.first_mismatch within the GPU bounds above."""
    return first_mismatch(s, ref, prompt, stream, max_ties=GPU_MAX_TIES, rtol=GPU_RTOL, tie_rtol=GPU_TIE_RTOL)


def gpu_session(path, **kw):
    kw.setdefault("type_k", "f32")
    kw.setdefault("type_v", "f32")
    kw.setdefault("n_threads", 2)
    return Session(path, budget=BUDGET, chunk=CHUNK, n_gpu_layers=-1, **kw)


@pytest.mark.parametrize("prompt_len", [10, 50], ids=["prompt<budget", "chunked"])
@pytest.mark.parametrize("flash_attn", [False, True], ids=["fa-off", "fa-on"])
@pytest.mark.parametrize("evict_interval", [1, 5], ids=["m=1", "m=5"])
@pytest.mark.parametrize("check_cells", ["0", "1"], ids=["predicted-cells", "read-cells"])
def test_offloaded_engine_matches_reference(
    tiny, prompt_len, flash_attn, evict_interval, check_cells, monkeypatch
):
    """predicted-cells: the engine places tokens by its mirror of llama.cpp's slot search, reading nothing;
    read-cells (TOVA_CHECK_CELLS=1): it also reads attn_inp_k_idxs every decode and fails on a disagreement."""
    monkeypatch.setenv("TOVA_CHECK_CELLS", check_cells)
    path, model = tiny
    rng = np.random.default_rng(prompt_len)
    tokens = rng.integers(0, model.n_vocab, size=prompt_len + STEPS).tolist()
    with gpu_session(path, flash_attn=flash_attn, evict_interval=evict_interval) as s:
        ref = Reference(model, BUDGET, CHUNK, evict_interval=evict_interval)
        msg = gpu_mismatch(s, ref, tokens[:prompt_len], tokens[prompt_len:])
        buffer = s.cache_buffer
    assert msg is None
    assert buffer and not buffer.startswith("CPU"), f"the KV cache is in {buffer!r}, not on the GPU"


@pytest.mark.parametrize("type_v", ["f32", "f16"])
def test_offloaded_transposed_v_moves_in_bounded_nodes(tiny, type_v):
    """Flash attention off: V is transposed on the device too; a chunked prompt's cuts move many cells per layer
    through a few graph nodes, not a strided copy per cell (the result is checked against the oracle above)."""
    path, model = tiny
    tokens = np.random.default_rng(3).integers(0, model.n_vocab, size=60).tolist()
    with gpu_session(path, type_v=type_v) as s:
        s.eval(tokens)
        st = s.engine_stats()
        assert s.n_occupied == BUDGET and not s.cache_buffer.startswith("CPU")
        assert st["cuts"] >= 2 and 0 < st["move_nodes"] <= 16 * s.n_layer * st["cuts"]


@pytest.mark.parametrize("prompt_len", [10, 50], ids=["prompt<budget", "chunked"])
def test_offloaded_h2o_matches_reference(tiny, prompt_len):
    """h2o with the cache on the GPU: each decode's column sums (every query row of a prompt piece, every head)
    formed on the device by csrc/reduce.cpp, n_kv floats read back per layer; GPU bounds."""
    path, model = tiny
    rng = np.random.default_rng(prompt_len + 1)
    tokens = rng.integers(0, model.n_vocab, size=prompt_len + STEPS).tolist()
    with gpu_session(path, policy="h2o") as s:
        ref = Reference(model, BUDGET, CHUNK, "h2o")
        msg = gpu_mismatch(s, ref, tokens[:prompt_len], tokens[prompt_len:])
    assert msg is None


# q4_0 is left out: CUDA's q4_0 flash attention is already 0.2 away from the oracle's logits on the prompt
# (before any eviction) and ~10x apart on the smallest scores; q4_0 is checked exactly on the CPU
# (test_reference.py) and for invariants with the rotation on, below.
@pytest.mark.parametrize("cache", ["f16", "q8_0"])
@pytest.mark.parametrize("evict_interval", [1, 4], ids=["m=1", "m=4"])
def test_offloaded_quantized_cache_matches_reference(tiny, cache, evict_interval, monkeypatch):
    """Flash attention on, K and V of one type on the GPU: the oracle that rounds K/V/q as ggml stores them.
    llama.cpp rotates q/k/v by a Hadamard matrix before a quantized cache when head_dim % 64 == 0; the oracle
    does not, so the rotation is switched off here (it leaves q.k unchanged; it changes what gets rounded).
    CUDA's quantized flash attention (q8_1 queries) is further from the oracle than the CPU's: a near tie here
    may be up to 2x in score; the exact quantized comparison runs on the CPU (test_reference.py)."""
    monkeypatch.setenv("LLAMA_ATTN_ROT_DISABLE", "1")
    path, model = tiny
    tokens = np.random.default_rng(20).integers(0, model.n_vocab, size=20 + STEPS).tolist()
    with gpu_session(path, flash_attn=True, type_k=cache, type_v=cache, evict_interval=evict_interval) as s:
        ref = Reference(model, BUDGET, CHUNK, evict_interval=evict_interval, type_k=cache, type_v=cache)
        msg = first_mismatch(s, ref, tokens[:20], tokens[20:], max_ties=GPU_MAX_TIES, rtol=0.15, tie_rtol=1.0)
        buffer = s.cache_buffer
    assert msg is None
    assert buffer and not buffer.startswith("CPU")


@pytest.mark.parametrize("variant", ["shared", "protect_newest"])
@pytest.mark.parametrize("flash_attn", [False, True], ids=["fa-off", "fa-on"])
def test_offloaded_wrong_policies_fail_the_gpu_bounds(tiny, variant, flash_attn):
    path, model = tiny
    tokens = np.random.default_rng(7).integers(0, model.n_vocab, size=20 + STEPS).tolist()
    with gpu_session(path, flash_attn=flash_attn) as s:
        ref = Reference(model, BUDGET, CHUNK, variant)
        msg = gpu_mismatch(s, ref, tokens[:20], tokens[20:])
    assert msg is not None and "differ" in msg


@pytest.mark.parametrize("cache", ["q8_0", "q4_0"])
def test_offloaded_rotated_quantized_cache_stays_bounded(tiny, cache):
    """llama.cpp's default for quantized caches with head_dim 64: Hadamard-rotated q/k/v. The query is taken from
    FLASH_ATTN_EXT (rotated like K), so scores stay q.k; checked here: invariants and finite logits."""
    path, model = tiny
    tokens = np.random.default_rng(3).integers(0, model.n_vocab, size=20 + STEPS).tolist()
    with gpu_session(path, flash_attn=True, type_k=cache, type_v=cache) as s:
        s.eval(tokens[:20])
        for t in tokens[20:]:
            s.eval([t])
            assert np.isfinite(s.logits()).all()
            assert s.n_occupied == BUDGET
            assert s.pos_window() == (s.n_past - BUDGET, s.n_past - 1)
            for row in s.kept_positions():
                assert np.unique(row).size == BUDGET and row.min() >= 0 and row.max() < s.n_past
        assert len({tuple(r) for r in s.kept_positions()}) > 1


@pytest.mark.parametrize("policy, m", [("full", 1), ("window", 1), ("sink", 1), ("tova", 8)])
def test_offloaded_unscored_decodes_read_no_node(tiny, policy, m):
    """A decode with no cut after it asks llama.cpp for no graph node (no split, no sync): the cells come from
    the engine's slot mirror, and tova runs it with the eval callback switched off. Only the first decode reads
    attn_inp_k_idxs once (to learn it lives on the GPU)."""
    from tova_cpp._ffi import lib

    path, model = tiny
    tokens = np.random.default_rng(5).integers(0, model.n_vocab, size=40).tolist()
    budget = 30 if policy == "full" else BUDGET
    with Session(
        path,
        budget=budget,
        chunk=CHUNK,
        policy=policy,
        evict_interval=m,
        n_gpu_layers=-1,
        flash_attn=True,
        n_threads=2,
    ) as s:
        s.eval(tokens[:5])
        observed = []
        for t in tokens[5:25]:
            s.eval([t])
            observed.append(lib.tova_engine_n_observed(s._engine))
            assert s.pos_window() == (s.n_past - s.n_occupied, s.n_past - 1)
        st = s.engine_stats()
        if policy == "tova":  # a scored decode every m-th token: one node per layer; the others none
            assert observed.count(0) >= len(observed) - len(observed) // m - 1
            # and those run with the callback switched off (llama.cpp's graph rebuilds put it back: a few)
            unscored = st["decodes"] - st["scored_decodes"]
            assert unscored - 3 <= st["plain_decodes"] <= unscored and st["plain_decodes"] >= 12
        else:
            assert observed == [0] * len(observed)
            if policy == "sink":  # 4 sinks protected: the callback is installed, and switched off as for tova
                assert st["decodes"] - 3 <= st["plain_decodes"] < st["decodes"]
            else:
                assert st["plain_decodes"] == st["decodes"]  # no callback at all


@pytest.mark.parametrize("kv_unified", [True, False], ids=["unified", "streams"])
@pytest.mark.parametrize(
    "policy, flash_attn", [("tova", False), ("tova", True), ("h2o", False)], ids=["fa-off", "fa-on", "h2o"]
)
@pytest.mark.parametrize("check_cells", ["0", "1"], ids=["predicted-cells", "read-cells"])
def test_offloaded_many_sequences_match_reference(
    tiny, policy, flash_attn, check_cells, kv_unified, monkeypatch
):
    """tests/test_batch.py's plan (5 sequences, different prompts, budgets, keep, evict_interval, start times,
    one removed; prompts within memory) in one BatchSession on the GPU: each sequence against the oracle run
    alone, GPU bounds. With flash attention the scores come from the batched scoring graph (one row per
    sequence; streams: one row per stream, over that stream's cells); without, from the device's attention sums
    (csrc/reduce.cpp: tova the scored rows' head sums, h2o every row's column sums per stream)."""
    from test_batch import PLAN_ONE_PIECE, replay_against_reference, run_batch

    monkeypatch.setenv("TOVA_CHECK_CELLS", check_cells)
    # this module's single-sequence Sessions ran first in this process with llama.cpp's CUDA graphs on: keep them
    # (the guard would warn that it cannot turn them off any more; these short runs never hit the abort it is for)
    monkeypatch.setenv("TOVA_CUDA_GRAPHS", "1")
    path, model = tiny
    plan = PLAN_ONE_PIECE  # prompts in one piece: the oracle can follow every near-tie cut (see test_batch)
    streams, got = run_batch(
        path, policy, flash_attn, model.n_vocab, plan=plan, n_gpu_layers=-1, kv_unified=kv_unified
    )
    for name, *_ in plan:
        msg = replay_against_reference(
            model,
            name,
            streams,
            got,
            policy,
            GPU_RTOL,
            max_ties=GPU_MAX_TIES,
            tie_rtol=GPU_TIE_RTOL,
            plan=plan,
        )
        assert msg is None


# -- sliding-window (iSWA) models: the policy on the full-attention layers, llama.cpp's window on the others --

# every policy with flash attention off and on (h2o refuses it); full: a budget above the text, no cut
ISWA_GPU_CASES = [
    (policy, fa)
    for policy in ("full", "tova", "window", "sink", "h2o")
    for fa in (False, True)
    if (policy, fa) != ("h2o", True)
]


@pytest.fixture(scope="module")
def tiny_iswa(tmp_path_factory):
    """test_swa.py's gemma3, gemma2 (softcaps) and gpt-oss (sinks) with head_dim 64 (CUDA's flash attention);
    gemma2 with head_dim 128: llama.cpp's CUDA flash-attention kernels with a logit softcap exist only for head
    sizes 128 and 256 (real Gemma 2 models), and any other size aborts inside ggml, with or without tova.
    gpt-oss routes to all 4 experts: with top-2 routing flash attention's F16 rounding flips a routing choice
    now and then and moves that step's logits by ~25% (seen on the CPU too), a discontinuity of the router,
    not of the attention this file checks."""
    out = {}
    folder = tmp_path_factory.mktemp("tiny-iswa-gpu")
    for arch, kw in GEMMA_CASES.items():
        head_dim = 128 if kw.get("attn_softcap") else 64
        out[arch] = (
            folder / f"{arch}.gguf",
            write_tiny_iswa(folder / f"{arch}.gguf", head_dim=head_dim, **kw),
        )
    path = folder / "gpt-oss.gguf"
    out["gpt-oss"] = (path, write_tiny_iswa(path, "gpt-oss", head_dim=64, n_expert_used=4))
    return out


def iswa_mismatch(path, model, policy, flash_attn, prompt_len, n_gpu_layers=-1) -> tuple[str | None, str]:
    """test_swa.py's step-by-step comparison with the oracle under the GPU bounds; (message, cache buffer)."""
    budget = prompt_len + SWA_STEPS if policy == "full" else SWA_BUDGET
    tokens = (
        np.random.default_rng(prompt_len).integers(0, model.n_vocab, size=prompt_len + SWA_STEPS).tolist()
    )
    with Session(
        path,
        budget=budget,
        chunk=SWA_CHUNK,
        policy=policy,
        flash_attn=flash_attn,
        type_k="f32",
        type_v="f32",
        n_gpu_layers=n_gpu_layers,
        n_threads=2,
    ) as s:
        assert s.managed_layers == model.full_layers
        ref = Reference(model, budget, SWA_CHUNK, "tova" if policy == "full" else policy)
        msg = swa_compare(
            s,
            ref,
            tokens[:prompt_len],
            tokens[prompt_len:],
            rtol=GPU_RTOL,
            max_ties=GPU_MAX_TIES if policy in ("tova", "h2o") else 0,
            tie_rtol=GPU_TIE_RTOL,
        )
        return msg, s.cache_buffer


@pytest.mark.parametrize(
    "policy, flash_attn", ISWA_GPU_CASES, ids=[f"{p}-fa{'on' if fa else 'off'}" for p, fa in ISWA_GPU_CASES]
)
@pytest.mark.parametrize("prompt_len", [10, 50], ids=["prompt<budget", "chunked"])
@pytest.mark.parametrize("arch", SWA_ARCHS)
def test_offloaded_iswa_matches_reference(tiny_iswa, arch, policy, flash_attn, prompt_len):
    """gemma3, gemma2 (softcapped scores) and gpt-oss (sinks in the softmax rows and in the scoring graph) with
    every layer and both caches on the GPU: logits and every full-attention layer's kept positions follow the
    oracle at every step."""
    path, model = tiny_iswa[arch]
    msg, buffer = iswa_mismatch(path, model, policy, flash_attn, prompt_len)
    assert msg is None
    # the engine learns the cache's buffer where it reads or moves rows; full and window never touch it
    assert buffer if policy in ("tova", "sink", "h2o") else buffer == ""
    assert not buffer.startswith("CPU"), f"the KV cache is in {buffer!r}, not on the GPU"


# On the H200 (2026-12-01) with flash attention off, the tiny gpt-oss's logits differ from the oracle by 0.7-0.9%
# of their scale from the first step, and within the GPU bounds both the right oracle and the sink-less one are
# followed: these bounds cannot see the sinks there. test_swa.py proves them at the CPU's bounds, and fa-on here
# (the scoring graph) does on the GPU. strict: the day the bounds do catch it, this must be turned back on.
_SINKS_UNSEEN = pytest.mark.xfail(
    strict=True, reason="the GPU bounds do not separate a sink-less oracle (fa off)"
)


@pytest.mark.parametrize("arch, variant", [("gpt-oss", "no_sink_scores"), ("gemma2", "no_softcap_scores")])
@pytest.mark.parametrize("flash_attn", [False, True], ids=["fa-off", "fa-on"])
def test_offloaded_iswa_wrong_scores_fail_the_gpu_bounds(request, tiny_iswa, arch, variant, flash_attn):
    """The GPU bounds still see the sinks and the softcap: an oracle that leaves either out of tova's scores
    disagrees with the engine (softmax rows with flash attention off, the scoring graph with it on)."""
    if arch == "gpt-oss" and not flash_attn:
        request.applymarker(_SINKS_UNSEEN)
    path, model = tiny_iswa[arch]
    tokens = np.random.default_rng(50).integers(0, model.n_vocab, size=50 + SWA_STEPS).tolist()
    with Session(
        path,
        budget=SWA_BUDGET,
        chunk=SWA_CHUNK,
        flash_attn=flash_attn,
        type_k="f32",
        type_v="f32",
        n_gpu_layers=-1,
    ) as s:
        ref = Reference(model, SWA_BUDGET, SWA_CHUNK, variant)
        msg = swa_compare(
            s, ref, tokens[:50], tokens[50:], rtol=GPU_RTOL, max_ties=GPU_MAX_TIES, tie_rtol=GPU_TIE_RTOL
        )
    assert msg is not None and "kept positions differ" in msg
