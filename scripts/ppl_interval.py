"""Quality and speed of evict_interval m: perplexity of teacher-forced text with TOVA at one budget and
m = 1, 4, 16 (and the full cache), the paper's per-token protocol (chunk 1: every token is one llama_decode;
m = 1 cuts after each token, m > 1 lets the cache grow to budget + m - 1 and cuts once it holds budget + m).
Prints llama-perplexity style lines. usage:
  python scripts/ppl_interval.py --text FILE [--budget 128] [--n 2048] [--intervals 1,4,16] [-t THREADS] [-m MODEL]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from tova_cpp import Session, default_model_path


def nll(s: Session, tokens, block: int = 128) -> tuple[np.ndarray, float]:
    """Negative log-likelihood of tokens[1:], fed in blocks (logits of a whole text would not fit in memory)."""
    out, dt = [], 0.0
    for i in range(0, len(tokens) - 1, block):
        t0 = time.perf_counter()
        logits = s.eval(tokens[i : min(i + block, len(tokens) - 1)], logits_all=True)
        dt += time.perf_counter() - t0
        logits = logits.astype(np.float64)
        m = logits.max(-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        target = tokens[i + 1 : i + 1 + len(logits)]
        out.append(-logp[np.arange(len(logits)), target])
    return np.concatenate(out), dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--budget", type=int, default=128)
    ap.add_argument("--n", type=int, default=2048, help="tokens of the text to score")
    ap.add_argument("--intervals", default="1,4,16")
    ap.add_argument("-t", "--threads", type=int, default=None)
    args = ap.parse_args()
    path = args.model or default_model_path()
    configs = [("full", 1)] + [("tova", int(m)) for m in args.intervals.split(",")]
    for policy, m in configs:
        budget = args.n + 8 if policy == "full" else args.budget
        with Session(
            path, budget=budget, policy=policy, chunk=1, evict_interval=m, n_threads=args.threads
        ) as s:
            tokens = np.array(s.tokenize(args.text.read_text())[: args.n])
            losses, dt = nll(s, tokens)
        ppl = float(np.exp(losses.mean()))
        err = float(ppl * losses.std() / np.sqrt(len(losses)))  # as llama-perplexity: PPL * stderr of the NLL
        label = "full" if policy == "full" else f"tova budget {args.budget} m={m}"
        print(
            f"{label:>24}: {len(tokens) - 1} tokens, {(len(tokens) - 1) / dt:.1f} tokens/s  "
            f"Final estimate: PPL = {ppl:.4f} +/- {err:.4f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
