"""Prompt-evaluation rate of `tova serve`'s engine against plain llama-cpp-python, in one process.

Each configuration evaluates random prompt tokens and reports tokens per wall second and per CPU-second of
this process (the second is what a shared machine's wall time hides). Configurations, all with the load test's
shape (tests/test_server_load.py: 32 sequences of budget 32, pieces of 64, up to 8 pieces = 512 tokens a step):

- plain: llama-cpp-python's Llama.eval of the same number of tokens in one sequence (n_batch = n_ubatch = 512),
  first and last;
- batch: a BatchSession step of 8 pieces of 64 tokens (consecutive ids), policy tova, flash attention off;
  variants change one thing: the policy (window, full), flash attention, the ids (every third: one llama_decode
  per piece), decoding sequences beside the pieces, one piece a step, pieces of 512, the unified cache.

    python scripts/prefill_rates.py -t 1
"""

from __future__ import annotations

import argparse
import time

import numpy as np

CONFIGS = {
    "tova": {},
    "window": {"policy": "window"},
    "full (budget 64, reset each step)": {"policy": "full", "budget": 64},
    "tova, flash attention on": {"fa": True},
    "tova, ids 0, 3, 6, ...": {"stride": 3},
    "tova, ids 0, 2, 4, ... beside 4 decoding": {"stride": 2, "dec": 4},
    "tova, 1 piece a step": {"seqs": 1, "steps_x": 8},
    "tova, 1 piece of 512 a step": {"seqs": 1, "chunk": 512},
    "tova, unified cache": {"unified": True},
}


def rate(fn) -> tuple[int, float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    n = fn()
    return n, time.perf_counter() - w0, time.process_time() - c0


def plain(model: str, threads: int, n: int, rng) -> tuple[int, float, float]:
    from llama_cpp import Llama

    llm = Llama(
        model,
        n_ctx=max(n, 512),
        n_batch=512,
        n_ubatch=512,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    llm.eval(rng.integers(100, 40000, 64).tolist())  # warm-up
    llm.reset()
    tokens = rng.integers(100, 40000, n).tolist()
    out = rate(lambda: (llm.eval(tokens), n)[1])
    llm.close()
    return out


def batch(model: str, threads: int, steps: int, rng, **kw) -> tuple[int, float, float]:
    from tova_cpp.batch import BatchSession

    chunk, seqs = kw.get("chunk", 64), kw.get("seqs", 8)
    bs = BatchSession(
        model,
        n_seq_max=32,
        budget=kw.get("budget", 32),
        policy=kw.get("policy", "tova"),
        chunk=chunk,
        n_ubatch=512,
        flash_attn=kw.get("fa", False),
        kv_unified=kw.get("unified", False),
        n_threads=threads,
    )
    ids = [bs.add() for _ in range(32)]
    use = ids[:: kw.get("stride", 1)][:seqs]
    decs = [q for q in ids if q not in use][: kw.get("dec", 0)]
    for q in [use[0], *decs]:  # warm-up; decoding sequences need a token before
        bs.step({q: rng.integers(100, 40000, chunk).tolist()})
    if kw.get("policy") == "full":
        for q in use:
            bs.reset(q)

    def go() -> int:
        n = 0
        for _ in range(steps * kw.get("steps_x", 1)):
            b = {q: rng.integers(100, 40000, chunk).tolist() for q in use}
            b.update({q: rng.integers(100, 40000, 1).tolist() for q in decs})
            bs.step(b)
            n += chunk * len(use)
            if kw.get("policy") == "full":  # full holds every token: start again within its cells
                for q in use:
                    bs.reset(q)
        return n

    out = rate(go)
    bs.close()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default=None, help="GGUF (default: SmolLM2-135M-Instruct)")
    p.add_argument("-t", "--threads", type=int, default=1)
    p.add_argument(
        "--steps", type=int, default=2, help="steps of 8 pieces per configuration (512 tokens each)"
    )
    args = p.parse_args()
    if args.model is None:
        from tova_cpp.models import default_model_path

        args.model = str(default_model_path())
    rng = np.random.default_rng(0)
    print(f"threads {args.threads}")
    print("| configuration | tokens | wall s | t/s | CPU s | t per CPU s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    rows = [("plain llama-cpp-python", lambda: plain(args.model, args.threads, 512 * args.steps, rng))]
    for name, kw in CONFIGS.items():
        rows.append((name, lambda kw=kw: batch(args.model, args.threads, args.steps, rng, **kw)))
    # again at the end: on a shared machine the two plain rows bracket the drift of the others
    rows.append(("plain llama-cpp-python (again)", rows[0][1]))
    for name, fn in rows:
        n, w, c = fn()
        print(f"| {name} | {n} | {w:.2f} | {n / w:.0f} | {c:.2f} | {n / c:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
