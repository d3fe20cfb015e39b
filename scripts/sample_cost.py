"""Host cost of sampling one token of one sequence, as the engine thread of `tova serve` and
stream_generate_batch pay it per stream and per step: the path before the greedy fast path / reused token-data
array / log_normalizer (rebuilt here: a fresh 'np.zeros + arange + assignment' array through the chain,
np.logaddexp.reduce in float64 for the logprob) against tova_cpp's path now, on random logits (float32,
standard normal x 3) of SmolLM2's vocabulary (49,152) and Llama 3's (128,256). Needs no model.

Paths: "server" = isfinite + sample (a request without logprobs), "+ logprob" = also the sampled token's
logprob (stream_generate_batch always computes it; the server when asked). Chains: "greedy" (temperature 0,
as scripts/load_server.py asks), "full" (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, repeat/frequency/
presence penalties 1.1/0.1/0.1). Also, for --streams rows of one step's logits matrix: a loop of per-row
np.argmax against one np.argmax(axis=1). docs/SERVER.md records a run.

    python scripts/sample_cost.py --tokens 300
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from tova_cpp.batch import sample_logits
from tova_cpp.generate import Sampler, log_normalizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from sampling_reference import reference_sample  # the path before: a fresh token-data array per token

CHAINS = {
    "greedy": dict(temperature=0.0),
    "full": dict(
        temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.1, frequency_penalty=0.1,
        presence_penalty=0.1,
    ),
}  # fmt: skip


def step_before(sampler, lg, logprob: bool) -> int:
    if not np.isfinite(lg).all():
        raise ValueError("non-finite logits")
    tok = reference_sample(sampler, lg)
    if logprob:
        float(lg[tok]) - float(np.logaddexp.reduce(lg.astype(np.float64)))
    return tok


def step_now(sampler, lg, logprob: bool) -> int:
    if not np.isfinite(lg).all():
        raise ValueError("non-finite logits")
    tok = sample_logits(sampler, lg)
    if logprob:
        float(lg[tok]) - log_normalizer(lg)
    return tok


def per_token_us(
    step, chain: dict, pool: list[np.ndarray], n_tokens: int, logprob: bool
) -> tuple[float, list]:
    """Median microseconds per token over n_tokens tokens (cycling through the pool of logits), and the tokens."""
    vocab = SimpleNamespace(n_vocab=pool[0].size, is_eog=lambda t: False)
    sampler = Sampler(vocab, seed=1, **chain)
    times, toks = [], []
    try:
        for i in range(n_tokens):
            lg = pool[i % len(pool)]
            t0 = time.perf_counter()
            toks.append(step(sampler, lg, logprob))
            times.append(time.perf_counter() - t0)
    finally:
        sampler.close()
    return float(np.median(times)) * 1e6, toks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=300, help="tokens per measurement (median reported)")
    p.add_argument("--vocab", default="49152,128256", help="vocabulary sizes (comma-separated)")
    p.add_argument(
        "--streams", type=int, default=64, help="rows of the step matrix for the argmax comparison"
    )
    args = p.parse_args()
    rng = np.random.default_rng(0)
    print("| vocab | chain | path | before us/token | now us/token | x |")
    print("| ---: | --- | --- | ---: | ---: | ---: |")
    for n in (int(v) for v in args.vocab.split(",")):
        pool = [(rng.standard_normal(n) * 3).astype(np.float32) for _ in range(16)]
        for name, chain in CHAINS.items():
            for logprob in (False, True):
                # the logaddexp reduce is slow: fewer tokens for it (the median is stable)
                k = max(20, args.tokens // 10) if logprob else args.tokens
                before, t_before = per_token_us(step_before, chain, pool, k, logprob)
                now, t_now = per_token_us(step_now, chain, pool, k, logprob)
                if t_before != t_now:
                    raise SystemExit(f"vocab {n}, {name}: the two paths sampled different tokens")
                path = "server + logprob" if logprob else "server"
                print(f"| {n} | {name} | {path} | {before:.0f} | {now:.0f} | {before / now:.1f} |")
        m = np.stack([pool[i % len(pool)] for i in range(args.streams)])
        t_loop, t_vec = [], []
        for _ in range(max(5, args.tokens // 20)):
            t0 = time.perf_counter()
            a = [int(np.argmax(row)) for row in m]
            t1 = time.perf_counter()
            b = np.argmax(m, axis=1).tolist()
            t_loop.append(t1 - t0)
            t_vec.append(time.perf_counter() - t1)
            assert a == b
        print(
            f"| {n} | greedy | argmax of a {args.streams}-row step: per-row loop -> one argmax(axis=1) | "
            f"{np.median(t_loop) * 1e6:.0f} | {np.median(t_vec) * 1e6:.0f} | "
            f"{np.median(t_loop) / np.median(t_vec):.1f} |"
        )


if __name__ == "__main__":
    main()
