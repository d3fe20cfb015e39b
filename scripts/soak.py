"""Soak: decode a long run token by token with a bounded cache and check that nothing grows or drifts.

For each policy (default tova and h2o) it decodes --tokens tokens (greedy, with a small repetition-breaking
rule so the text does not loop on one token), samples resident memory every --every tokens after a warm-up,
and checks the invariants at every sample: occupied cells == budget, llama.cpp's metadata a contiguous window
ending at n_past - 1, every layer's kept positions unique, <= newest, and the same count; logits finite.
Passes when the resident set after the warm-up stays within --rss-tol (1%) of its first sample.
With --csv every sample is appended (and flushed) as it is taken, so a long run can be watched and a run
stopped early (--max-seconds, or killed) still leaves its samples; --summarize prints the table from CSVs
and --plot draws them (needs matplotlib).

    python scripts/soak.py --tokens 100000 --csv soak.csv    # the full soak (not in CI)
    python scripts/soak.py --tokens 5000 --every 500         # a short proof run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def rss_mib() -> float:
    """Current (not peak) resident set size, from /proc/self/statm."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def invariants(s) -> None:
    assert s.n_occupied == s.budget, (s.n_occupied, s.budget)
    lo, hi = s.pos_window()
    assert (lo, hi) == (s.n_past - s.n_occupied, s.n_past - 1), (lo, hi, s.n_past)
    for row in s.kept_positions():
        row = row[row >= 0]
        assert row.size == s.n_occupied and np.unique(row).size == row.size and row.max() <= s.n_past - 1


def soak(path: Path, policy: str, args, csv, stop_at: float) -> dict:
    from tova_cpp import Session

    with Session(path, budget=args.budget, chunk=64, policy=policy, n_threads=args.threads) as s:
        s.eval(s.tokenize("Once upon a time, in a lighthouse by the sea,"))
        samples, recent = [], []
        t0 = time.perf_counter()
        done = 0
        for i in range(1, args.tokens + 1):
            logits = s.logits()
            if not np.isfinite(logits).all():
                raise AssertionError(f"non-finite logits at token {i}")
            logits[recent] -= 5.0  # discourage the last few tokens: keeps the text from collapsing to a loop
            tok = int(np.argmax(logits))
            recent = (recent + [tok])[-8:]
            s.eval([tok])
            done = i
            if i % args.every == 0:
                invariants(s)
                rss = rss_mib()
                if i >= args.warmup:
                    samples.append((i, rss))
                if csv is not None:
                    elapsed = time.perf_counter() - t0
                    csv.write(f"{policy},{i},{rss:.2f},{elapsed:.1f},{int(i >= args.warmup)},1\n")
                    csv.flush()
                if time.time() >= stop_at:
                    break
        seconds = time.perf_counter() - t0
    base = samples[0][1] if samples else float("nan")
    drift = max(abs(r - base) for _, r in samples) / base if samples else float("nan")
    return {
        "policy": policy,
        "tokens": done,
        "complete": done == args.tokens,
        "budget": args.budget,
        "checks": done // args.every,
        "rss_first_mib": round(base, 1),
        "rss_last_mib": round(samples[-1][1], 1) if samples else None,
        "rss_max_drift": drift,
        "tok_s": done / seconds,
        "ok": drift <= args.rss_tol,
    }


def read_csv(paths: list[Path]) -> list[list[str]]:
    return [line.split(",") for path in paths for line in path.read_text().splitlines()[1:]]


def summarize(samples: list[list[str]], rss_tol: float) -> list[dict]:
    """The table's rows from CSV samples (a run that was stopped or killed still has them)."""
    rows = []
    for policy in dict.fromkeys(r[0] for r in samples):
        pts = [r for r in samples if r[0] == policy]
        after = [float(r[2]) for r in pts if r[4] == "1"]
        base = after[0] if after else float("nan")
        drift = max(abs(m - base) for m in after) / base if after else float("nan")
        tokens, seconds = int(pts[-1][1]), float(pts[-1][3])
        rows.append(
            {
                "policy": policy,
                "tokens": tokens,
                "checks": len(pts),
                "rss_first_mib": round(base, 1),
                "rss_last_mib": round(after[-1], 1) if after else None,
                "rss_max_drift": drift,
                "tok_s": tokens / seconds,
                "ok": drift <= rss_tol,
            }
        )
    return rows


def plot(samples: list[list[str]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for policy in dict.fromkeys(r[0] for r in samples):
        pts = [(int(r[1]), float(r[2])) for r in samples if r[0] == policy]
        ax.plot([t for t, _ in pts], [m for _, m in pts], marker=".", label=policy)
    ax.set_xlabel("tokens decoded")
    ax.set_ylabel("resident memory (MiB)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default=None, help="GGUF (default: SmolLM2-135M-Instruct)")
    p.add_argument("--policies", default="tova,h2o")
    p.add_argument("--tokens", type=int, default=100_000)
    p.add_argument("--budget", type=int, default=64)
    p.add_argument("--every", type=int, default=1000, help="tokens between samples")
    p.add_argument("--warmup", type=int, default=1000, help="tokens before the first memory sample")
    p.add_argument("--rss-tol", type=float, default=0.01)
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("-o", "--out", default=None, help="JSON file")
    p.add_argument("--csv", default=None, help="append every sample here as it is taken")
    p.add_argument("--plot", default=None, help="PNG of the CSV's samples (needs --csv and matplotlib)")
    p.add_argument("--max-seconds", type=float, default=None, help="stop (and report partial) after this")
    p.add_argument(
        "--summarize", default=None, help="comma list of CSVs: print their table (and --plot), run nothing"
    )
    args = p.parse_args()
    if args.summarize:
        samples = read_csv([Path(x) for x in args.summarize.split(",")])
        print("| policy | tokens | checks | RSS first MiB | RSS last MiB | max drift | t/s | ok |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
        for r in summarize(samples, args.rss_tol):
            print(
                f"| {r['policy']} | {r['tokens']} | {r['checks']} | {r['rss_first_mib']} | {r['rss_last_mib']} | "
                f"{r['rss_max_drift']:.2%} | {r['tok_s']:.1f} | {'yes' if r['ok'] else 'NO'} |"
            )
        if args.plot:
            plot(samples, Path(args.plot))
        return 0
    stop_at = time.time() + args.max_seconds if args.max_seconds else float("inf")
    csv = None
    if args.csv:
        csv = open(args.csv, "w")  # kept open for the whole run, closed below
        csv.write("policy,tokens,rss_mib,seconds,after_warmup,invariants_ok\n")
        csv.flush()
    from tova_cpp.models import default_model_path

    path = Path(args.model) if args.model else default_model_path()
    rows = []
    print("| policy | tokens | budget | checks | RSS first MiB | RSS last MiB | max drift | t/s | ok |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for policy in args.policies.split(","):
        r = soak(path, policy, args, csv, stop_at)
        rows.append(r)
        partial = "" if r["complete"] else " (stopped early)"
        print(
            f"| {policy} | {r['tokens']}{partial} | {r['budget']} | {r['checks']} | {r['rss_first_mib']} | "
            f"{r['rss_last_mib']} | {r['rss_max_drift']:.2%} | {r['tok_s']:.1f} | {'yes' if r['ok'] else 'NO'} |",
            flush=True,
        )
    if csv is not None:
        csv.close()
        if args.plot:
            plot(read_csv([Path(args.csv)]), Path(args.plot))
    if args.out:
        Path(args.out).write_text(
            json.dumps({"command": " ".join(sys.argv), "results": rows}, indent=1) + "\n"
        )
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
