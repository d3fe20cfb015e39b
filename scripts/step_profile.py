"""Where a single sequence's decode time goes on a GPU (docs/RESULTS-GPU.md, session of 2026-12-02).

Default: the engine's split per token (tova_engine_stats) for one Session with every layer offloaded and flash
attention on: a 512-token prompt, 64 warm-up tokens, then 128 timed single-token evals (no logits read), the
same protocol as `tova bench speed -d 512 --budgets 512`. Prints one "PROF" line: tokens/s, us/token of each
time counter, and the counts (decodes, scored decodes, plain decodes, scoring graph nodes, mover nodes, cuts).

--cycle: the wall time of each of 256 single-token evals grouped by the number of cells past the budget, i.e.
the place in the evict-interval cycle (0 = the decode a cut followed), and by whether a cut ran. Prints one
"CYCLE" line.

    python scripts/step_profile.py MODEL.gguf -m 8 [--policy tova] [--cycle] [--label L]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from tova_cpp import Session

BUDGET, PROMPT, WARMUP = 512, 512, 64
TIMERS = [
    "capture_s",
    "score_s",
    "score_build_s",
    "score_compute_s",
    "score_read_s",
    "cut_s",
    "choose_s",
    "move_s",
]
TIMERS += ["decode_s", "scored_decode_s", "step_s"]
COUNTS = ["decodes", "scored_decodes", "plain_decodes", "score_nodes", "move_nodes", "cuts", "score_builds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("-m", "--evict-interval", type=int, default=1)
    ap.add_argument("--policy", default="tova")
    ap.add_argument("--cycle", action="store_true")
    ap.add_argument("--label", default="")
    a = ap.parse_args()
    with Session(
        a.model,
        budget=BUDGET,
        chunk=256,
        n_threads=4,
        n_gpu_layers=-1,
        flash_attn=True,
        policy=a.policy,
        evict_interval=a.evict_interval,
    ) as s:
        rng = np.random.default_rng(0)
        s.eval(rng.integers(0, s.n_vocab, size=PROMPT))
        gen = rng.integers(0, s.n_vocab, size=WARMUP + (256 if a.cycle else 128))
        for t in gen[:WARMUP]:
            s.eval([t])
        if a.cycle:
            times: dict = {}
            for t in gen[WARMUP:]:
                before = s.engine_stats()["cuts"]
                t0 = time.perf_counter()
                s.eval([t])
                dt = time.perf_counter() - t0
                times.setdefault("cut" if s.engine_stats()["cuts"] > before else "other", []).append(dt)
                times.setdefault(s.n_occupied - BUDGET, []).append(dt)  # 0 right after a cut
            print(
                f"CYCLE {a.label} {a.policy} m={a.evict_interval}: "
                + " ".join(
                    f"{k}:{np.mean(v) * 1e3:.2f}ms(n={len(v)})"
                    for k, v in sorted(times.items(), key=lambda kv: str(kv[0]))
                )
            )
            return
        s.engine_stats(reset=True)
        t0 = time.perf_counter()
        for t in gen[WARMUP:]:
            s.eval([t])
        dt = time.perf_counter() - t0
        st = s.engine_stats()
    n = len(gen) - WARMUP
    print(
        f"PROF {a.label} {a.policy} m={a.evict_interval}: {n / dt:.1f} t/s; us/token "
        + " ".join(f"{k[:-2]}={st[k] * 1e6 / n:.0f}" for k in TIMERS)
        + " | "
        + " ".join(f"{k}={st[k]:.0f}" for k in COUNTS)
    )


if __name__ == "__main__":
    main()
