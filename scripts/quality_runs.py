"""Issue 16's quality grid on one model, as a few `tova bench` processes at once, then one combined table per
part. Processes sharing one GPU time-slice it: on an H200 with Qwen2.5-Coder-1.5B two TOVA processes ran at
94 + 113 tokens/s against ~130 alone (1.6x in total), while twelve (TOVA, h2o, sink, window) ran each TOVA
process at 8.8 tokens/s, about what running them one after another gives (docs/RESULTS.md section 6). Keep
--jobs at 2 on a GPU; on a CPU, cores / threads.

Parts (each job is one `tova bench` command; its log and results go to OUT/<part>/<job>/):
  ppl    perplexity of --n-windows windows of --ctx tokens for every policy at every budget (flash attention
         off, h2o included) and TOVA at evict_interval 8 and 32
  quant  TOVA and the full cache with f16, q8_0 and q4_0 caches, flash attention on, every budget
  ruler  RULER from a `tova bench ruler --prepare` file: full (one Session per answer), then each bounded policy
         in each of --ruler-modes as one job answering --ruler-batch prompts at once (every task and compression)
Then `tova bench ppl|ruler --combine` merges each part into OUT/<part>-all/ (CSV, JSON; plots with --plot).

Jobs start part by part in the order of --parts, longest first within a part; a job whose command finished
(OUT/<part>/<job>/done.txt) is skipped, and a job that was interrupted resumes where its results stop (every
command runs with --resume): rerun the same command to finish an interrupted grid. --stop-after SECONDS starts no
job after that many seconds (those left are listed).

    python scripts/quality_runs.py -m qwen.gguf -ngl 99 --jobs 2 --ruler-data ruler-data.jsonl -o q16
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

BOUNDED = ("tova", "h2o", "sink", "window")


@dataclass
class Job:
    part: str
    name: str
    argv: list[str]  # after `python -m tova_cpp.bench`
    weight: float  # rough relative cost, for longest-first order


# written into a job's folder when its command exits 0 (results files are saved as they come)
DONE = "done.txt"


def _ppl_base(a: argparse.Namespace) -> list[str]:
    return ["ppl", "-m", a.model, "-ngl", str(a.ngl), "--texts", a.texts, "--ctx", str(a.ctx),
            "--n-windows", str(a.n_windows), "-t", str(a.threads), "--no-plot", "--resume"]  # fmt: skip


def _steps(a: argparse.Namespace, budget: int) -> float:
    """Share of a window fed one token at a time (the first `budget` tokens are batched): a job's rough cost."""
    return max(a.ctx - budget, 1) / a.ctx


def ppl_jobs(a: argparse.Namespace) -> list[Job]:
    base = _ppl_base(a)
    jobs = [Job("ppl", "full", [*base, "--policies", "full"], 0.1)]
    for b in a.budgets:
        for p in BOUNDED:
            ei = ["--evict-interval", "1,8,32"] if p == "tova" else []
            jobs.append(Job("ppl", f"{p}-{b}", [*base, "--policies", p, "--budgets", str(b), *ei],
                            _steps(a, b) * (2.2 if p == "tova" else 1)))  # fmt: skip
    return jobs


def quant_jobs(a: argparse.Namespace) -> list[Job]:
    base = [*_ppl_base(a), "-fa"]
    jobs = []
    for ct in ("f16", "q8_0", "q4_0"):
        cache = ["-ctk", ct, "-ctv", ct]
        jobs.append(Job("quant", f"full-{ct}", [*base, *cache, "--policies", "full"], 0.1))
        for b in a.budgets:
            jobs.append(Job("quant", f"tova-{ct}-{b}", [*base, *cache, "--policies", "tova", "--budgets", str(b)],
                            _steps(a, b)))  # fmt: skip
    return jobs


def ruler_jobs(a: argparse.Namespace) -> list[Job]:
    """full once, one Session per answer; each bounded policy in each mode as one job answering --ruler-batch
    prompts at once (BatchSession). Weights from the H200 run of docs/RESULTS.md section 6b (525 answers in fits
    mode, 4-7 processes sharing the GPU): tova 14 min, h2o 10, sink and window 4.4, full's 175 answers 1.8."""
    if not a.ruler_data:
        raise SystemExit("the ruler part needs --ruler-data (a `tova bench ruler --prepare` file)")
    base = ["ruler", "-m", a.model, "-ngl", str(a.ngl), "--data", a.ruler_data, "-t", str(a.threads)]
    base += ["--tasks", a.tasks, "--n-samples", str(a.n_samples), "--no-plot", "--resume"]
    jobs = [Job("ruler", "full", [*base, "--policies", "full", "--batch", "0"], 1.8)]
    weight = {"tova": 14, "h2o": 10, "sink": 4.4, "window": 4.4}
    for mode in a.ruler_modes.split(","):
        for p in BOUNDED:
            argv = [*base, "--policies", p, "--modes", mode, "--batch", str(a.ruler_batch)]
            jobs.append(Job("ruler", f"{p}-{mode}", argv, weight[p]))
    return jobs


PARTS = {"ppl": ppl_jobs, "quant": quant_jobs, "ruler": ruler_jobs}


def run_job(job: Job, out: Path) -> tuple[Job, int, float]:
    folder = out / job.part / job.name
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(folder / "log.txt", "w") as log:
        rc = subprocess.run(
            [sys.executable, "-m", "tova_cpp.bench", *job.argv, "-o", str(folder)],
            stdout=log,
            stderr=subprocess.STDOUT,
            check=False,
        ).returncode
    dt = time.perf_counter() - t0
    if rc == 0:
        (folder / DONE).write_text(f"{' '.join(job.argv)}\n{dt:.1f} s\n")
    return job, rc, dt


def combine(part: str, out: Path, plot: bool) -> int:
    kind = "ruler" if part == "ruler" else "ppl"
    csvs = sorted(
        str(p) for p in (out / part).glob(f"*/{kind}-samples.csv" if kind == "ruler" else "*/ppl.csv")
    )
    if not csvs:
        return 0
    argv = [kind, "--combine", *csvs, "-o", str(out / f"{part}-all")] + ([] if plot else ["--no-plot"])
    with open(out / f"{part}-all.txt", "w") as f:
        return subprocess.run([sys.executable, "-m", "tova_cpp.bench", *argv], stdout=f, stderr=subprocess.STDOUT,
                              check=False).returncode  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-ngl", type=int, default=99)
    ap.add_argument("--parts", default="ppl,quant,ruler")
    ap.add_argument("--jobs", type=int, default=2, help="processes at once (a GPU: 2-3)")
    ap.add_argument("-t", "--threads", type=int, default=1, help="threads per process")
    ap.add_argument("--texts", default="pg")
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--n-windows", type=int, default=2)
    ap.add_argument("--budgets", default="64,128,256,512,1024,2048")
    ap.add_argument("--ruler-data")
    ap.add_argument("--tasks", default="niah_single_2,niah_multikey_1,vt,cwe,fwe,qa_1,qa_2")
    ap.add_argument("--n-samples", type=int, default=25)
    ap.add_argument("--ruler-modes", default="fits,stream")
    ap.add_argument("--ruler-batch", type=int, default=16, help="prompts answered at once per ruler job")
    ap.add_argument("--stop-after", type=float, default=None, help="start no job after this many seconds")
    ap.add_argument("--plot", action="store_true", help="plots in the combined folders (needs matplotlib)")
    ap.add_argument("-o", "--out", default="quality_runs")
    a = ap.parse_args(argv)
    a.budgets = [int(b) for b in a.budgets.split(",")]
    out = Path(a.out)
    parts = a.parts.split(",")
    jobs = [j for part in parts for j in PARTS[part](a)]
    todo = [j for j in jobs if not (out / j.part / j.name / DONE).is_file()]
    # parts in the order given, longest first in each
    todo.sort(key=lambda j: (parts.index(j.part), -j.weight))
    print(f"# {len(jobs)} jobs, {len(jobs) - len(todo)} done already, {len(todo)} to run, {a.jobs} at once",
          flush=True)  # fmt: skip
    t0 = time.perf_counter()
    failed, skipped = [], []

    def submit(pool, queue: list[Job], running: set) -> None:
        """Start the next queued job, unless --stop-after has passed (then every queued job is listed)."""
        if queue and a.stop_after is not None and time.perf_counter() - t0 > a.stop_after:
            skipped.extend(j.name for j in queue)
            queue.clear()
        if queue:
            running.add(pool.submit(run_job, queue.pop(0), out))

    with ThreadPoolExecutor(a.jobs) as pool:
        queue, running = list(todo), set()
        for _ in range(a.jobs):
            submit(pool, queue, running)
        while running:
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                job, rc, dt = fut.result()
                print(
                    f"{time.perf_counter() - t0:7.1f}s {job.part}/{job.name}: rc {rc}, {dt:.1f} s", flush=True
                )
                if rc != 0:
                    failed.append(f"{job.part}/{job.name}")
                submit(pool, queue, running)
    for part in dict.fromkeys(j.part for j in jobs):
        combine(part, out, a.plot)
    print(f"# {time.perf_counter() - t0:.0f} s; failed: {failed or 'none'}; not started: {skipped or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
