"""The reference comparison with every layer and the KV cache on a GPU (CUDA or Metal build of llama.cpp):
the mover and the flash-attention scoring graph then run as ggml graphs on the device. Skipped without one."""

from __future__ import annotations

import llama_cpp
import numpy as np
import pytest
from reference import Reference
from test_reference import BUDGET, CHUNK, STEPS, first_mismatch
from tiny_gguf import write_tiny_llama

from tova_cpp import Session

pytestmark = pytest.mark.skipif(
    not llama_cpp.llama_supports_gpu_offload(),
    reason="llama-cpp-python was built without a GPU backend (CMAKE_ARGS=-DGGML_CUDA=on or Metal)",
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-gpu") / "tiny-llama-f32.gguf"
    return path, write_tiny_llama(path)


def gpu_session(path, **kw):
    kw.setdefault("type_k", "f32")
    kw.setdefault("type_v", "f32")
    return Session(path, budget=BUDGET, chunk=CHUNK, n_threads=2, n_gpu_layers=-1, **kw)


@pytest.mark.parametrize("prompt_len", [10, 50], ids=["prompt<budget", "chunked"])
@pytest.mark.parametrize("flash_attn", [False, True], ids=["fa-off", "fa-on"])
@pytest.mark.parametrize("evict_interval", [1, 5], ids=["m=1", "m=5"])
def test_offloaded_engine_matches_reference(tiny, prompt_len, flash_attn, evict_interval):
    path, model = tiny
    rng = np.random.default_rng(prompt_len)
    tokens = rng.integers(0, model.n_vocab, size=prompt_len + STEPS).tolist()
    with gpu_session(path, flash_attn=flash_attn, evict_interval=evict_interval) as s:
        ref = Reference(model, BUDGET, CHUNK, evict_interval=evict_interval)
        msg = first_mismatch(s, ref, tokens[:prompt_len], tokens[prompt_len:], max_ties=3 * flash_attn)
        buffer = s.cache_buffer
    assert msg is None
    assert buffer and not buffer.startswith("CPU"), f"the KV cache is in {buffer!r}, not on the GPU"


@pytest.mark.parametrize("cache", ["f16", "q8_0", "q4_0"])
def test_offloaded_quantized_cache_matches_cpu(tmp_path, cache):
    """Same model, same tokens, flash attention on: the GPU run keeps the same sets as the CPU run."""
    path = tmp_path / "tiny-128.gguf"
    write_tiny_llama(path, n_embd=128)
    tokens = np.random.default_rng(1).integers(0, 64, size=200).tolist()
    kept = []
    for n_gpu_layers in (0, -1):
        with Session(path, budget=BUDGET, chunk=CHUNK, n_threads=2, n_gpu_layers=n_gpu_layers, flash_attn=True,
                     type_k=cache, type_v=cache) as s:
            s.eval(tokens[:30])
            rows = []
            for t in tokens[30:]:
                s.eval([t])
                rows.append(s.kept_positions())
            kept.append(np.array(rows))
    same = (kept[0] == kept[1]).all(axis=(2,)).mean()
    # CPU and CUDA kernels round differently (Q is quantized to q8_0 vs q8_1): allow rare near-tie flips
    assert same >= 0.9, f"only {same:.0%} of layer-steps keep the same set on GPU and CPU"
