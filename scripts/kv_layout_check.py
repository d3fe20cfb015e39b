"""llama.cpp alone (no tova_cpp engine, no eviction): does one sequence's output depend on which cells of a
unified KV cache it occupies? It decodes the same prompt into sequence 0 of a fresh context twice, once on an
empty cache and once after three other sequences took the first cells, and prints how far the last logits
move; then it changes what the other sequences hold (same cells): 0 means nothing leaks between sequences,
only the layout moves the arithmetic. This is why `tova serve`'s greedy streams may part from the same
conversation run alone (docs/SERVER.md, "Batched arithmetic").

    python scripts/kv_layout_check.py [-m MODEL.gguf]
"""

from __future__ import annotations

import argparse

import llama_cpp
import llama_cpp._logger
import numpy as np


def decode(ctx, n_vocab: int, tokens: list[int], seq: int, pos0: int) -> np.ndarray:
    b = llama_cpp.llama_batch_init(len(tokens), 0, 1)
    try:
        b.n_tokens = len(tokens)
        for i, t in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i] = t, pos0 + i, 1
            b.seq_id[i][0] = seq
            b.logits[i] = i == len(tokens) - 1
        if llama_cpp.llama_decode(ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).copy()
    finally:
        llama_cpp.llama_batch_free(b)


def last_logits(model, n_vocab: int, others: int, flash_attn: bool, first: int = 100) -> np.ndarray:
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max, cp.kv_unified = 1024, 64, 64, 4, True
    cp.n_threads = cp.n_threads_batch = 1
    cp.flash_attn_type = (
        llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    )
    ctx = llama_cpp.llama_init_from_model(model, cp)
    try:
        for seq in range(1, others + 1):
            decode(ctx, n_vocab, list(range(first, first + 50)), seq, 0)
        prompt = list(range(1000, 1180))
        for i in range(0, len(prompt), 64):
            out = decode(ctx, n_vocab, prompt[i : i + 64], 0, i)
        return out
    finally:
        llama_cpp.llama_free(ctx)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default=None, help="GGUF (default: SmolLM2-135M-Instruct)")
    args = p.parse_args()
    if args.model is None:
        from tova_cpp.models import default_model_path

        args.model = str(default_model_path())
    llama_cpp._logger.set_verbose(False)
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(args.model.encode(), llama_cpp.llama_model_default_params())
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    for fa in (False, True):
        a = last_logits(model, n_vocab, 0, fa)
        b = last_logits(model, n_vocab, 3, fa)
        c = last_logits(model, n_vocab, 3, fa, first=500)  # the same cells taken, by other tokens
        print(
            f"flash_attn={fa}: same prompt, same positions, other cells: max |dlogit| / max |logit| = "
            f"{np.abs(a - b).max() / np.abs(a).max():.2e}; greedy token {int(a.argmax())} vs {int(b.argmax())}; "
            f"same cells, other sequences' tokens changed: {np.abs(b - c).max() / np.abs(a).max():.2e}"
        )
    llama_cpp.llama_model_free(model)


if __name__ == "__main__":
    main()
