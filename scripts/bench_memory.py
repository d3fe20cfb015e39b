"""Resident memory of a long bounded generation, sampled from outside the process.

Runs `tova generate -n N --budget B --ignore-eos` (SmolLM2 by default) as a child process and reads its VmRSS
from /proc every --interval seconds; writes the samples as CSV, a PNG of RSS over time, and prints a summary
(RSS at 10%, 50%, 100% of the run and the growth after the first 10%). Linux only (reads /proc).

    .venv/bin/python scripts/bench_memory.py -n 20000 --budget 256 --out docs/memory
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=20000)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--policy", default="tova")
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--raw", action="store_true", help="plain-text prompt (a model without a chat template)")
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("--out", default="docs/memory", help="output prefix (.csv, .png)")
    args = ap.parse_args()

    cmd = [
        sys.executable,
        "-m",
        "tova_cpp",
        "generate",
        "-p",
        "Tell me a very long story about a lighthouse.",
        "-n",
        str(args.n),
        "--budget",
        str(args.budget),
        "--policy",
        args.policy,
        "--ignore-eos",
        "--temp",
        "0.7",
        "-s",
        "1",
    ]
    if args.model:
        cmd += ["-m", str(Path(args.model).resolve())]
    if args.threads:
        cmd += ["-t", str(args.threads)]
    if args.raw:
        cmd.append("--raw")
    t0 = time.perf_counter()
    # cwd outside the checkout, so the installed package (with its built engine) is the one imported
    p = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tempfile.gettempdir()
    )
    samples = []
    while p.poll() is None:
        r = rss_mib(p.pid)
        if r is not None:
            samples.append((time.perf_counter() - t0, r))
        time.sleep(args.interval)
    err = p.stderr.read()
    if p.returncode != 0:
        print(err, file=sys.stderr)
        return p.returncode
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seconds", "rss_mib"])
        w.writerows((f"{t:.2f}", f"{r:.1f}") for t, r in samples)

    def at(frac: float) -> float:
        return samples[min(len(samples) - 1, int(frac * (len(samples) - 1)))][1]

    tail = [r for t, r in samples if t >= samples[-1][0] * 0.1]
    print(" ".join(cmd[1:]))
    print(err.strip())
    print(f"samples: {len(samples)} over {samples[-1][0]:.1f} s")
    print(f"RSS MiB at 10% / 50% / 100% of the run: {at(0.1):.1f} / {at(0.5):.1f} / {at(1.0):.1f}")
    print(
        f"after the first 10%: min {min(tail):.1f}, max {max(tail):.1f}, growth {max(tail) - min(tail):.1f} MiB"
    )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return 0
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([t for t, _ in samples], [r for _, r in samples])
    ax.set_xlabel("seconds")
    ax.set_ylabel("resident memory (MiB)")
    ax.set_ylim(0, max(r for _, r in samples) * 1.2)
    ax.set_title(f"tova generate -n {args.n} --budget {args.budget} ({args.policy})")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=100)
    return 0


if __name__ == "__main__":
    sys.exit(main())
