"""Plain llama-cpp-python, no tova_cpp: perplexity of the first N tokens of the PG essays with f16, q8_0 and
q4_0 KV caches (flash attention on, one batched pass). Tells whether a cache type's quality on a model is
llama.cpp's own (docs/RESULTS.md section 6a: Qwen2.5-Coder-1.5B collapses with a q4_0 cache, with or without
eviction).

usage: python scripts/kv_type_check.py [-m MODEL] [--n 1024] [-t THREADS]
"""

from __future__ import annotations

import argparse
import time

import llama_cpp
import numpy as np

from tova_cpp.bench import common
from tova_cpp.bench.ppl import _nll, perplexity
from tova_cpp.session import CACHE_TYPES

TYPES = ("f16", "q8_0", "q4_0")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default="qwen2.5-coder-1.5b", help="GGUF path or a packaged model's name")
    p.add_argument("--n", type=int, default=1024, help="tokens (one window, one batch)")
    p.add_argument("-t", "--threads", type=int, default=2)
    a = p.parse_args(argv)
    path = common.model_path(a.model)
    _, text = common.load_text("pg")
    for name in TYPES:
        t = CACHE_TYPES[name]
        llm = llama_cpp.Llama(str(path), n_ctx=a.n, n_batch=a.n, n_ubatch=a.n, logits_all=True, flash_attn=True,
                              type_k=t, type_v=t, n_threads=a.threads, verbose=False)  # fmt: skip
        toks = llm.tokenize(text[: a.n * 8].encode(), add_bos=False)[: a.n]
        t0 = time.perf_counter()
        llm.eval(toks)
        nll = _nll(llm.scores[: len(toks) - 1], np.asarray(toks[1:]))
        ppl, _ = perplexity(nll)
        print(f"{name}: PPL {ppl:.4f} over {nll.size} tokens ({time.perf_counter() - t0:.0f} s)")
        llm.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
