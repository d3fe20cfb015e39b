"""Paired comparison of per-token losses written by `tova bench ppl` (nll-*.npy, or the nll-*.partial.npy of a run
still going or stopped): on the positions both files hold, the PPL of each, the mean loss difference with its
paired standard error (per-token differences: much tighter than the two PPLs' own +/-), and the same per block
of positions. A loss at position i depends only on the tokens before it, so a partial file's losses are final.

usage: python scripts/compare_nll.py A.npy B.npy [--full FULL.npy] [--block 512] [--from 0]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np


def paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean of a - b and its standard error."""
    d = a.astype(np.float64) - b.astype(np.float64)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--full", help="the full cache's losses: PPL of each relative to it on the same positions")
    p.add_argument("--block", type=int, default=512, help="positions per row of the per-block table")
    p.add_argument("--from", dest="start", type=int, default=0, help="first position compared")
    args = p.parse_args(argv)
    a, b = np.load(args.a), np.load(args.b)
    full = np.load(args.full) if args.full else None
    n = min(a.size, b.size, full.size if full is not None else a.size)
    s = slice(args.start, n)
    a, b = a[s], b[s]
    name_a, name_b = Path(args.a).stem.removeprefix("nll-"), Path(args.b).stem.removeprefix("nll-")
    print(f"positions {args.start}..{n - 1} ({a.size} predicted tokens)")
    for name, x in ((name_a, a), (name_b, b)):
        line = f"  {name}: PPL {math.exp(x.mean()):.4f}"
        if full is not None:
            f = full[s]
            m, se = paired(x, f)
            line += f" | vs full {100 * (math.exp(m) - 1):+.2f}% (paired se {100 * se:.2f}%)"
        print(line)
    m, se = paired(a, b)
    print(f"  {name_a} - {name_b}: mean loss {m:+.5f} nats (paired se {se:.5f}), PPL ratio {math.exp(m):.4f}")
    print()
    print(f"| positions | PPL {name_a} | PPL {name_b} | mean loss a - b | se | share of tokens a < b |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for lo in range(args.start, n, args.block):
        hi = min(n, lo + args.block)
        x, y = a[lo - args.start : hi - args.start], b[lo - args.start : hi - args.start]
        if x.size < 2:
            continue
        dm, dse = paired(x, y)
        print(
            f"| {lo}-{hi - 1} | {math.exp(x.mean()):.3f} | {math.exp(y.mean()):.3f} | {dm:+.4f} | {dse:.4f} | "
            f"{(x < y).mean():.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
