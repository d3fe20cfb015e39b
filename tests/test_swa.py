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
from tiny_gguf import write_tiny_gemma

# the oracle's GELU emulates ggml's f16 table; an f32 input that rounds to the neighbouring f16 moves one
# activation by an f16 step: logits agree to ~3e-4 of their largest magnitude
GEMMA_RTOL = 1e-3
GEMMA_CASES = {
    "gemma3": {"arch": "gemma3"},
    "gemma2": {"arch": "gemma2", "attn_softcap": 5.0, "final_softcap": 3.0},
}


@pytest.fixture(scope="module")
def gemmas(tmp_path_factory):
    """arch -> (path, TinyGemma): 4 layers, sliding-window pattern 2 (layers 1 and 3 full), window 8."""
    out = {}
    for arch, kw in GEMMA_CASES.items():
        path = tmp_path_factory.mktemp("tiny-gemma") / f"tiny-{arch}-f32.gguf"
        out[arch] = (path, write_tiny_gemma(path, **kw))
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


@pytest.mark.parametrize("arch", list(GEMMA_CASES))
def test_oracle_matches_llama_cpp(gemmas, arch):
    """The oracle's Gemma (window masks, NEOX RoPE, per-layer RoPE base, q/k norms, GELU, softcaps) is
    llama.cpp's: 60 tokens, 7.5 windows of 8."""
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
    ],
    ids=[
        "no-window",
        "every-layer-full",
        "one-rope-base",
        "gemma2-no-window",
        "no-attn-softcap",
        "no-final-softcap",
    ],
)
def test_oracle_without_a_feature_fails(gemmas, arch, change):
    """Each feature the oracle models is visible in the comparison above: dropping it fails it."""
    path, model = gemmas[arch]
    tokens = np.random.default_rng(0).integers(0, model.n_vocab, size=60).tolist()
    wrong = dataclasses.replace(model, **change)
    assert oracle_error(wrong, tokens, llama_cpp_logits(path, tokens)) > 10 * GEMMA_RTOL
