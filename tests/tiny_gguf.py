"""Tiny random llama GGUFs (F32 weights) for tests, written with gguf.GGUFWriter."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class TinyLlama:
    n_layer: int = 3
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 96
    n_vocab: int = 64
    eps: float = 1e-5
    rope_base: float = 10000.0
    qk_gain: float = 3.0  # sharpens attention so the lowest score is never a rounding tie
    weights: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


# a ChatML template (SmolLM2's shape) for the byte-tokenizer fixture
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'"
    " + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def write_tiny_llama(
    path: Path, *, seed: int = 0, extra: dict | None = None, tokenizer: str = "none", **shape
) -> TinyLlama:
    """Writes a llama GGUF; weights are numpy (n_out, n_in), y = W @ x. `extra`: more metadata keys.

    tokenizer "none": ids only (vocab n_vocab). "bytes": a SentencePiece vocab of the specials above and the
    256 byte tokens, ChatML template, EOS/EOG = <|im_end|>; the special tokens' output rows are zero, so
    greedy or top-k sampling never ends a generation (tests control the length)."""
    import gguf

    if tokenizer == "bytes":
        shape["n_vocab"] = len(SPECIALS) + 256
    m = TinyLlama(**shape)
    rng = np.random.default_rng(seed)
    d, kv = m.n_embd, m.n_head_kv * m.head_dim

    def lin(n_out, n_in, gain=1.0):
        return (rng.standard_normal((n_out, n_in)) * gain / np.sqrt(n_in)).astype(np.float32)

    w = m.weights
    w["token_embd.weight"] = rng.standard_normal((m.n_vocab, d)).astype(np.float32)
    for il in range(m.n_layer):
        p = f"blk.{il}."
        w[p + "attn_norm.weight"] = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
        w[p + "attn_q.weight"] = lin(d, d, m.qk_gain)
        w[p + "attn_k.weight"] = lin(kv, d, m.qk_gain)
        w[p + "attn_v.weight"] = lin(kv, d)
        w[p + "attn_output.weight"] = lin(d, d)
        w[p + "ffn_norm.weight"] = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
        w[p + "ffn_gate.weight"] = lin(m.n_ff, d)
        w[p + "ffn_up.weight"] = lin(m.n_ff, d)
        w[p + "ffn_down.weight"] = lin(d, m.n_ff)
    w["output_norm.weight"] = np.ones(d, dtype=np.float32)
    w["output.weight"] = lin(m.n_vocab, d)
    if tokenizer == "bytes":
        w["output.weight"][: len(SPECIALS)] = 0.0

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(4096)
    writer.add_embedding_length(d)
    writer.add_block_count(m.n_layer)
    writer.add_feed_forward_length(m.n_ff)
    writer.add_head_count(m.n_head)
    writer.add_head_count_kv(m.n_head_kv)
    writer.add_layer_norm_rms_eps(m.eps)
    writer.add_rope_freq_base(m.rope_base)
    writer.add_vocab_size(m.n_vocab)
    if tokenizer == "bytes":
        writer.add_tokenizer_model("llama")
        writer.add_token_list(SPECIALS + [f"<0x{b:02X}>" for b in range(256)])
        writer.add_token_scores([0.0] * m.n_vocab)
        writer.add_token_types([2, 3, 3, 3, 3] + [6] * 256)  # unknown, control x4, byte
        writer.add_unk_token_id(0)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(4)
        writer.add_add_bos_token(True)
        writer.add_chat_template(CHATML)
    else:
        writer.add_tokenizer_model("none")
    for key, value in (extra or {}).items():
        if isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    _write(writer, w)
    return m


@dataclass
class TinyIswa:
    """A tiny random iSWA model: sliding-window layers interleaved with full-attention layers.

    swa_pattern p: layer il is a sliding-window layer unless il % p == p - 1 (llama.cpp's set_swa_pattern);
    n_swa: a sliding-window query at position i sees keys at positions j with i - j < n_swa."""

    arch: str = "gemma3"
    n_layer: int = 4
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 16
    n_vocab: int = 64
    n_swa: int = 8
    swa_pattern: int = 2
    qk_gain: float = 3.0  # sharpens attention so the lowest score is never a rounding tie
    weights: dict[str, np.ndarray] = field(default_factory=dict)

    def is_swa(self, il: int) -> bool:
        p = self.swa_pattern
        return p == 0 or il % p < p - 1

    @property
    def full_layers(self) -> list[int]:
        return [il for il in range(self.n_layer) if not self.is_swa(il)]


@dataclass
class TinyGemma(TinyIswa):
    """Gemma 2/3: gemma2 adds attention-logit and final-logit softcapping; gemma3 adds q/k RMSNorm and a separate
    RoPE base for the sliding-window layers."""

    n_ff: int = 96
    eps: float = 1e-6
    rope_base: float = 1e6  # full-attention layers
    rope_base_swa: float = 1e4  # gemma3's sliding-window layers (llama.cpp's fixed value); gemma2: rope_base
    attn_softcap: float = 0.0  # gemma2: tanh cap on the attention logits
    final_softcap: float = 0.0  # gemma2: tanh cap on the output logits


@dataclass
class TinyGptOss(TinyIswa):
    """gpt-oss: attention with biases and a learned sink logit per head (it enters each head's softmax
    denominator), sliding-window layers on even indices (llama.cpp's default pattern 2), NEOX RoPE, and a mixture
    of experts (top-k of a biased router, softmax over the chosen logits, clamped SwiGLU)."""

    arch: str = "gpt-oss"
    n_ff: int = 32  # per expert
    n_expert: int = 4
    n_expert_used: int = 2
    eps: float = 1e-5
    rope_base: float = 1e4
    sink_scale: float = 6.0  # sink logits ~ N(0, 36): heads differ widely in the mass left to the keys


def write_tiny_iswa(
    path: Path,
    arch: str = "gemma3",
    *,
    seed: int = 0,
    write_pattern: bool | None = None,
    pattern_array: bool = False,
    **shape,
) -> TinyGemma | TinyGptOss:
    """Writes a gemma2, gemma3 or gpt-oss GGUF with F32 weights (numpy (n_out, n_in), y = W @ x; experts stacked
    first), token ids only. Gemma ties the output matrix to the embeddings. write_pattern: store
    {arch}.attention.sliding_window_pattern (default: for gemma, not for gpt-oss, which then gets llama.cpp's
    default for the architecture); pattern_array: store it as one bool per layer (true: sliding) instead of the
    integer."""
    import gguf

    oss = arch == "gpt-oss"
    m = TinyGptOss(**shape) if oss else TinyGemma(arch=arch, **shape)
    if arch == "gemma2":
        m.rope_base_swa = m.rope_base
    rng = np.random.default_rng(seed)
    d, hd, ff = m.n_embd, m.head_dim, m.n_ff

    def lin(n_out, n_in, gain=1.0):
        return (rng.standard_normal((n_out, n_in)) * gain / np.sqrt(n_in)).astype(np.float32)

    def norm(n):
        return (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    def vec(*n, scale=0.1):
        return (scale * rng.standard_normal(n)).astype(np.float32)

    w = m.weights
    embd = rng.standard_normal((m.n_vocab, d))
    w["token_embd.weight"] = (embd if oss else embd / np.sqrt(d)).astype(np.float32)
    for il in range(m.n_layer):
        p = f"blk.{il}."
        w[p + "attn_norm.weight"] = 1 + vec(d) if oss else norm(d)
        for name, n_out, gain in (
            ("q", m.n_head, m.qk_gain),
            ("k", m.n_head_kv, m.qk_gain),
            ("v", m.n_head_kv, 1.0),
        ):
            w[p + f"attn_{name}.weight"] = lin(n_out * hd, d, gain)
            if oss:
                w[p + f"attn_{name}.bias"] = vec(n_out * hd)
        if arch == "gemma3":
            # gemma3 normalises q and k per head: the gain goes into the norm weights
            w[p + "attn_q_norm.weight"] = norm(hd) * m.qk_gain
            w[p + "attn_k_norm.weight"] = norm(hd)
        w[p + "attn_output.weight"] = lin(d, m.n_head * hd)
        if oss:
            w[p + "attn_output.bias"] = vec(d)
            w[p + "attn_sinks.weight"] = vec(m.n_head, scale=m.sink_scale)
            w[p + "post_attention_norm.weight"] = 1 + vec(d)
            w[p + "ffn_gate_inp.weight"], w[p + "ffn_gate_inp.bias"] = (
                lin(m.n_expert, d, 3.0),
                vec(m.n_expert),
            )
            for name, n_out, n_in in (("gate", ff, d), ("up", ff, d), ("down", d, ff)):
                w[p + f"ffn_{name}_exps.weight"] = np.stack([lin(n_out, n_in) for _ in range(m.n_expert)])
                w[p + f"ffn_{name}_exps.bias"] = vec(m.n_expert, n_out)
        else:
            w[p + "post_attention_norm.weight"] = norm(d)
            w[p + "ffn_norm.weight"] = norm(d)
            w[p + "ffn_gate.weight"] = lin(ff, d)
            w[p + "ffn_up.weight"] = lin(ff, d)
            w[p + "ffn_down.weight"] = lin(d, ff)
            w[p + "post_ffw_norm.weight"] = norm(d)
    w["output_norm.weight"] = np.ones(d, dtype=np.float32)
    if oss:
        w["output.weight"] = lin(m.n_vocab, d)

    writer = gguf.GGUFWriter(str(path), m.arch)
    writer.add_context_length(4096)
    writer.add_embedding_length(d)
    writer.add_block_count(m.n_layer)
    writer.add_feed_forward_length(ff)
    if oss:
        writer.add_expert_feed_forward_length(ff)
        writer.add_expert_count(m.n_expert)
        writer.add_expert_used_count(m.n_expert_used)
    writer.add_head_count(m.n_head)
    writer.add_head_count_kv(m.n_head_kv)
    writer.add_key_length(hd)
    writer.add_value_length(hd)
    writer.add_layer_norm_rms_eps(m.eps)
    writer.add_rope_freq_base(m.rope_base)
    writer.add_sliding_window(m.n_swa)
    if write_pattern if write_pattern is not None else not oss:
        # spelled out: gguf < 0.19 has no add_sliding_window_pattern (the same key and types)
        key = f"{m.arch}.attention.sliding_window_pattern"
        if pattern_array:
            writer.add_array(key, [m.is_swa(il) for il in range(m.n_layer)])
        else:
            writer.add_uint32(key, m.swa_pattern)
    if not oss and m.attn_softcap:
        writer.add_attn_logit_softcapping(m.attn_softcap)
    if not oss and m.final_softcap:
        writer.add_final_logit_softcapping(m.final_softcap)
    writer.add_vocab_size(m.n_vocab)
    writer.add_tokenizer_model("none")
    _write(writer, w)
    return m


def write_tiny_recurrent(path: Path, arch: str, *, seed: int = 0) -> None:
    """Writes a tiny random Mamba (recurrent memory: every layer a state-space block) or Jamba (hybrid: layer 0
    a Mamba block, layer 1 attention, each with a SwiGLU FFN) GGUF, F32, token ids only; for refusals only."""
    import gguf

    assert arch in ("mamba", "jamba")
    n_layer, d, n_vocab, n_ff = 2, 16, 64, 32
    d_inner, d_conv, d_state, dt_rank = 2 * d, 4, 8, 2  # jamba needs d_inner = 2 * n_embd
    rng = np.random.default_rng(seed)

    def rand(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)

    w = {"token_embd.weight": rand(n_vocab, d)}
    head_count_kv = []
    for il in range(n_layer):
        p = f"blk.{il}."
        w[p + "attn_norm.weight"] = np.ones(d, dtype=np.float32)
        attention = arch == "jamba" and il == 1
        head_count_kv.append(2 if attention else 0)
        if attention:
            w[p + "attn_q.weight"], w[p + "attn_output.weight"] = rand(d, d), rand(d, d)
            w[p + "attn_k.weight"], w[p + "attn_v.weight"] = rand(d // 2, d), rand(d // 2, d)
        else:
            w[p + "ssm_in.weight"] = rand(2 * d_inner, d)
            w[p + "ssm_conv1d.weight"], w[p + "ssm_conv1d.bias"] = rand(d_inner, d_conv), rand(d_inner)
            w[p + "ssm_x.weight"] = rand(dt_rank + 2 * d_state, d_inner)
            w[p + "ssm_dt.weight"], w[p + "ssm_dt.bias"] = rand(d_inner, dt_rank), rand(d_inner)
            w[p + "ssm_a"] = -np.abs(rand(d_inner, d_state))
            w[p + "ssm_d"] = np.ones(d_inner, dtype=np.float32)
            w[p + "ssm_out.weight"] = rand(d, d_inner)
            if arch == "jamba":
                w[p + "ssm_dt_norm.weight"] = np.ones(dt_rank, dtype=np.float32)
                w[p + "ssm_b_norm.weight"] = np.ones(d_state, dtype=np.float32)
                w[p + "ssm_c_norm.weight"] = np.ones(d_state, dtype=np.float32)
        if arch == "jamba":
            w[p + "ffn_norm.weight"] = np.ones(d, dtype=np.float32)
            w[p + "ffn_gate.weight"], w[p + "ffn_up.weight"] = rand(n_ff, d), rand(n_ff, d)
            w[p + "ffn_down.weight"] = rand(d, n_ff)
    w["output_norm.weight"] = np.ones(d, dtype=np.float32)
    w["output.weight"] = rand(n_vocab, d)

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(4096)
    writer.add_embedding_length(d)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff if arch == "jamba" else 0)
    writer.add_head_count(4 if arch == "jamba" else 0)
    writer.add_head_count_kv(head_count_kv)
    writer.add_ssm_conv_kernel(d_conv)
    writer.add_ssm_inner_size(d_inner)
    writer.add_ssm_state_size(d_state)
    writer.add_ssm_time_step_rank(dt_rank)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_tokenizer_model("none")
    _write(writer, w)


def _write(writer, tensors: dict) -> None:
    """Adds the tensors and writes the file (header, metadata, data)."""
    for name, arr in tensors.items():
        writer.add_tensor(name, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
