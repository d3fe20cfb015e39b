"""Per-token decode cost of TOVA vs the full cache holding the same number of cells (flash attention off).

Both sessions hold `budget` tokens before timing starts. `full` then decodes with depth budget..budget+n
(nothing evicted); `tova` decodes with the cache pinned at `budget` cells (capture + one cut per token).
Prints a llama-bench-like table; the ratio tova/full is the engine's overhead.
usage: python scripts/bench_overhead.py [--budget 512] [-n 128] [--reps 3] [-t THREADS] [-m MODEL]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np

from tova_cpp import Session, default_model_path


def decode_times(path, policy, budget, n, threads):
    chunk = 64
    # full must hold budget + n tokens; tova needs budget + chunk cells
    session_budget = budget + n if policy == "full" else budget
    with Session(path, budget=session_budget, policy=policy, chunk=chunk, n_threads=threads) as s:
        rng = np.random.default_rng(0)
        s.eval(rng.integers(100, s.n_vocab - 100, size=budget))  # depth `budget`, any tokens will do
        times = []
        for _ in range(n):
            tok = int(np.argmax(s.logits()))
            t0 = time.perf_counter()
            s.eval([tok])
            times.append(time.perf_counter() - t0)
        assert s.n_occupied == (budget + n if policy == "full" else budget)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("-t", "--threads", type=int, default=None)
    args = ap.parse_args()
    path = args.model or default_model_path()
    decode_times(path, "tova", args.budget, 16, args.threads)  # warm-up
    rows = {}
    for policy in ("full", "tova"):
        per_rep = [
            statistics.median(decode_times(path, policy, args.budget, args.n, args.threads))
            for _ in range(args.reps)
        ]
        rows[policy] = per_rep
    print(f"machine: {platform.machine()} {platform.processor() or ''} threads={args.threads or 'default'}")
    print("| model | policy | cells | test | ms/token (median per rep) | t/s |")
    print("| --- | --- | ---: | --- | ---: | ---: |")
    for policy, reps in rows.items():
        ms = [1e3 * r for r in reps]
        print(
            f"| {path.name if hasattr(path, 'name') else path} | {policy} | {args.budget} | tg{args.n} "
            f"| {statistics.mean(ms):.3f} ± {statistics.pstdev(ms):.3f} | {1e3 / statistics.mean(ms):.1f} |"
        )
    ratio = statistics.mean(rows["tova"]) / statistics.mean(rows["full"])
    print(f"TOVA per-token time / full: {ratio:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
