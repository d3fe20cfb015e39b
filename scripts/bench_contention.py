"""Token-by-token decode speed idle vs beside a busy process, for plain llama-cpp-python and each policy.

Why it matters: the llama-cpp-python wheel's ggml CPU backend runs graphs on an OpenMP team; every graph node
ends in a team barrier and every node the engine observes (tova/h2o: one per layer) starts a new parallel
region. When another process holds one of the cores, a thread of the team is descheduled and its peers wait for
it at every barrier; libgomp's default waiter spins first, burning the time slice the late thread needs.
tova_cpp's default thread count (n_threads unset: tova_cpp/threads.py) follows the cores other processes leave
free; this script compares it with fixed thread counts, plain llama-cpp-python, and libgomp's wait policies
(OMP_WAIT_POLICY / GOMP_SPINCOUNT are read when libgomp loads, so every configuration runs in a fresh process).

Each configuration runs twice: idle, and beside --busy processes of `while True: pass`; each run decodes
--reps repetitions of --tokens tokens (a repetition also stops after --rep-seconds) after a warm-up of at least
half a second, and reports the median tokens/s. A configuration is policy:threads[:wait], threads "auto" for
tova_cpp's default; plain is llama_cpp.Llama (its own default n_threads is cpu_count // 2).

    python scripts/bench_contention.py -o contention.json        # the default set (a few minutes at most)
    python scripts/bench_contention.py --configs plain:2,tova:auto,tova:2:passive --reps 3

Prints a llama-bench-like table. Measure on an otherwise idle machine: the busy processes should be its only
other load (the table's "threads used" column shows what the default chose)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

DEFAULT_CONFIGS = (
    "plain:2,plain:default,tova:auto,tova:2,tova:1,tova:2:passive,full:auto,window:auto,sink:auto,h2o:auto"
)
BUSY = "while True: pass"


def child(args: argparse.Namespace) -> None:
    import numpy as np

    from tova_cpp.models import default_model_path

    path = args.model or str(default_model_path())
    prompt = list(range(1000, 1000 + args.budget))  # fills the budget: every decode evicts
    threads = None if args.threads in ("auto", "default") else int(args.threads)
    room = args.budget + 64 + args.reps * args.tokens + 16  # the prompt, the warm-up and every repetition
    if args.policy == "plain":
        import llama_cpp

        kw = {} if threads is None else {"n_threads": threads, "n_threads_batch": threads}
        llm = llama_cpp.Llama(path, n_ctx=room, verbose=False, **kw)
        llm.eval(prompt)
        used = lambda: llm.context_params.n_threads  # noqa: E731

        def step():
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])

    else:
        from tova_cpp import Session

        budget = room if args.policy == "full" else args.budget
        s = Session(path, budget=budget, chunk=64, policy=args.policy, n_threads=threads)
        s.eval(prompt)
        used = lambda: s.n_threads  # noqa: E731

        def step():
            s.eval([int(np.argmax(s.logits()))])

    t0 = time.perf_counter()
    for i in range(64):  # warm-up: at least 4 tokens and half a second (the default re-measures free cores)
        step()
        if i >= 3 and time.perf_counter() - t0 > 0.5:
            break
    rates = []
    for _ in range(args.reps):
        t0, n = time.perf_counter(), 0
        while n < args.tokens and time.perf_counter() - t0 < args.rep_seconds:
            step()
            n += 1
        rates.append(n / (time.perf_counter() - t0))
    print(json.dumps({"tok_s": rates, "threads_used": used()}))


def measure(args, config: str, busy: int) -> dict:
    policy, threads, *wait = config.split(":")
    wait = wait[0] if wait else "default"
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    env.pop("GOMP_SPINCOUNT", None)
    if wait.startswith("spin"):  # spinN: libgomp spins N iterations at a barrier, then sleeps
        env["GOMP_SPINCOUNT"] = wait[4:]
    elif wait != "default":
        env["OMP_WAIT_POLICY"] = wait
    hogs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(busy)]
    try:
        time.sleep(0.5 if busy else 0)
        cmd = [sys.executable, __file__, "--child", "--policy", policy, "--threads", threads]
        cmd += ["--tokens", str(args.tokens), "--budget", str(args.budget), "--reps", str(args.reps)]
        cmd += ["--rep-seconds", str(args.rep_seconds)] + (["-m", args.model] if args.model else [])
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        return {
            "median": statistics.median(r["tok_s"]),
            "runs": r["tok_s"],
            "threads_used": r["threads_used"],
        }
    finally:
        for h in hogs:
            h.kill()
            h.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default=None, help="GGUF (default: SmolLM2-135M-Instruct)")
    p.add_argument("--tokens", type=int, default=32, help="decoded tokens per repetition")
    p.add_argument("--reps", type=int, default=5, help="repetitions per run (the median is reported)")
    p.add_argument("--rep-seconds", type=float, default=2.0, help="a repetition stops after this long")
    p.add_argument("--budget", type=int, default=128, help="KV budget (and prompt length)")
    p.add_argument(
        "--configs",
        default=DEFAULT_CONFIGS,
        help="comma list of policy:threads[:wait]; policy plain (llama_cpp.Llama) or a tova_cpp policy; "
        "threads N, auto (tova_cpp's default) or default (plain's); wait: OMP_WAIT_POLICY value "
        "(passive, active) or spinN (GOMP_SPINCOUNT=N), libgomp's default when left out",
    )
    p.add_argument("--busy", type=int, default=1, help="busy processes beside the contended run")
    p.add_argument("-o", "--out", default=None, help="JSON file")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--policy", default="tova", help=argparse.SUPPRESS)
    p.add_argument("--threads", default="auto", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    rows, t_start = [], time.perf_counter()
    print(f"| config | idle t/s | beside {args.busy} busy t/s | kept | threads used idle / busy |")
    print("| --- | ---: | ---: | ---: | --- |")
    for config in args.configs.split(","):
        idle = measure(args, config, 0)
        busy = measure(args, config, args.busy)
        rows.append({"config": config, "idle": idle, "busy": busy})
        print(
            f"| {config} | {idle['median']:.2f} | {busy['median']:.2f} | {busy['median'] / idle['median']:.0%} | "
            f"{idle['threads_used']} / {busy['threads_used']} |",
            flush=True,
        )
    print(
        f"({time.perf_counter() - t_start:.0f} s; medians of {args.reps} repetitions of {args.tokens} tokens)"
    )
    if args.out:
        meta = {"command": " ".join(sys.argv), "cores": len(os.sched_getaffinity(0)), "busy": args.busy}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
