"""Synthetic random-weight llamas for speed measurements (the weights are random, so the text is noise):
Llama-3.2-1B and Llama-3-8B shapes, written with gguf.GGUFWriter. Used by `tova bench speed --synthetic`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SHAPES = {
    # Llama-3.2-1B and Llama-3-8B shapes
    "1b": dict(n_embd=2048, n_layer=16, n_head=32, n_head_kv=8, n_ff=8192, n_vocab=128256, wtype="f16"),
    "8b": dict(n_embd=4096, n_layer=32, n_head=32, n_head_kv=8, n_ff=14336, n_vocab=128256, wtype="q4_0"),
    # smoke tests of this script on a CPU
    "tiny": dict(n_embd=256, n_layer=2, n_head=4, n_head_kv=2, n_ff=512, n_vocab=1000, wtype="q4_0"),
    "tiny16": dict(n_embd=256, n_layer=2, n_head=4, n_head_kv=2, n_ff=512, n_vocab=1000, wtype="f16"),
}


def _random_f16(rng, shape, std):
    # tile a 4M-element random block: independence does not matter for speed, writing 2 GB of fresh noise does
    n = int(np.prod(shape))
    base = (rng.standard_normal(min(n, 1 << 22)) * std).astype(np.float16)
    return np.resize(base, n).reshape(shape)


def _random_q4_0(rng, shape, std):
    """Q4_0 bytes [rows, cols/32*18]: per block an f16 scale then 16 bytes of nibbles (values (q-8)*d)."""
    rows, cols = shape
    nb = cols // 32
    base = rng.integers(0, 256, size=(min(rows, 256), nb, 18), dtype=np.uint8)
    d = np.float16(std / 4.6)  # uniform nibbles: std of (q-8) is ~4.6
    base[:, :, 0:2] = np.frombuffer(np.array([d], dtype=np.float16).tobytes(), dtype=np.uint8)
    blocks = np.resize(base, (rows, nb, 18))
    return blocks.reshape(rows, nb * 18)


def write_model(path: Path, name: str) -> dict:
    try:
        import gguf
    except ImportError:
        raise ImportError("synthetic models need the gguf package: pip install gguf") from None

    sh = SHAPES[name]
    d, L, nh, nkv, ff, V = (sh[k] for k in ("n_embd", "n_layer", "n_head", "n_head_kv", "n_ff", "n_vocab"))
    hd = d // nh
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(131072)
    w.add_embedding_length(d)
    w.add_block_count(L)
    w.add_feed_forward_length(ff)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(500000.0)
    w.add_vocab_size(V)
    w.add_tokenizer_model("none")
    w.add_file_type(1 if sh["wtype"] == "f16" else 2)

    def lin(tname, n_out, n_in):
        std = 1.0 / np.sqrt(n_in)
        if sh["wtype"] == "f16":
            w.add_tensor(tname, _random_f16(rng, (n_out, n_in), std))
        else:
            w.add_tensor(
                tname, _random_q4_0(rng, (n_out, n_in), std), raw_dtype=gguf.GGMLQuantizationType.Q4_0
            )

    lin("token_embd.weight", V, d)
    for il in range(L):
        p = f"blk.{il}."
        w.add_tensor(p + "attn_norm.weight", np.ones(d, dtype=np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(d, dtype=np.float32))
        lin(p + "attn_q.weight", d, d)
        lin(p + "attn_k.weight", nkv * hd, d)
        lin(p + "attn_v.weight", nkv * hd, d)
        lin(p + "attn_output.weight", d, d)
        lin(p + "ffn_gate.weight", ff, d)
        lin(p + "ffn_up.weight", ff, d)
        lin(p + "ffn_down.weight", d, ff)
    w.add_tensor("output_norm.weight", np.ones(d, dtype=np.float32))
    lin("output.weight", V, d)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sh
