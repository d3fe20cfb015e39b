"""Token-by-token decode speed idle vs beside busy processes, for plain llama-cpp-python and each policy.

Why it matters: the llama-cpp-python wheel's ggml CPU backend uses OpenMP; every graph node ends in a
barrier and every observed node (tova/h2o read one per layer) starts a new parallel region. When another
process holds one of the cores, a 2-thread team waits at each barrier for its descheduled peer, and libgomp's
spinning waiter (OMP_WAIT_POLICY unset: spin, then sleep) burns the time slice the peer needs. The knobs
compared here: the thread count and OMP_WAIT_POLICY (read by libgomp when it loads, so each configuration runs
in a fresh process).

    python scripts/bench_contention.py                  # SmolLM2, 128 tokens, threads 1,2, wait default,passive
    python scripts/bench_contention.py --tokens 32 --policies plain,tova --threads 2 --wait default

Prints a llama-bench-like table and writes JSON (-o). Measure on an otherwise idle machine: the busy
processes are the only load it should see."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

POLICIES = ["plain", "full", "tova", "window", "sink", "h2o"]
BUSY = "while True: pass"


def child(args: argparse.Namespace) -> None:
    import numpy as np

    from tova_cpp.models import default_model_path

    path = args.model or str(default_model_path())
    prompt = list(range(1000, 1000 + args.budget))  # fills the budget: every decode evicts
    n = args.tokens
    if args.policy == "plain":
        import llama_cpp

        llm = llama_cpp.Llama(
            path,
            n_ctx=args.budget + n + 256,
            n_threads=args.threads,
            n_threads_batch=args.threads,
            verbose=False,
        )
        llm.eval(prompt)

        def step():
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])

    else:
        from tova_cpp import Session

        budget = args.budget + n + 8 if args.policy == "full" else args.budget
        s = Session(path, budget=budget, chunk=64, policy=args.policy, n_threads=args.threads)
        s.eval(prompt)

        def step():
            s.eval([int(np.argmax(s.logits()))])

    for _ in range(4):  # warm-up
        step()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    print(json.dumps({"tok_s": n / (time.perf_counter() - t0)}))


def measure(args, policy: str, threads: int, wait: str, busy: int) -> float:
    env = dict(os.environ)
    if wait.startswith("spin"):  # spinN: libgomp spins N iterations at a barrier, then sleeps
        env["GOMP_SPINCOUNT"] = wait[4:]
    elif wait != "default":
        env["OMP_WAIT_POLICY"] = wait
    hogs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(busy)]
    try:
        time.sleep(0.5 if busy else 0)
        cmd = [sys.executable, __file__, "--child", "--policy", policy, "--threads", str(threads)]
        cmd += ["--tokens", str(args.tokens), "--budget", str(args.budget)]
        cmd += ["-m", args.model] if args.model else []
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])["tok_s"]
    finally:
        for h in hogs:
            h.kill()
            h.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default=None, help="GGUF (default: SmolLM2-135M-Instruct)")
    p.add_argument("--tokens", type=int, default=128, help="decoded tokens per measurement")
    p.add_argument("--budget", type=int, default=128, help="KV budget (and prompt length)")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--threads", default="1,2", help="comma list")
    p.add_argument(
        "--wait",
        default="default,passive,spin10000",
        help="OMP_WAIT_POLICY values: default (unset), passive, active, or spinN (GOMP_SPINCOUNT=N)",
    )
    p.add_argument("--busy", type=int, default=1, help="busy processes beside the contended run")
    p.add_argument("-o", "--out", default=None, help="JSON file")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--policy", default="tova", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.threads = int(args.threads)
        return child(args)

    rows = []
    print("| policy | threads | OMP_WAIT_POLICY | idle t/s | busy t/s | kept |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for policy in args.policies.split(","):
        for threads in (int(t) for t in args.threads.split(",")):
            for wait in args.wait.split(","):
                idle = measure(args, policy, threads, wait, 0)
                busy = measure(args, policy, threads, wait, args.busy)
                rows.append(
                    {
                        "policy": policy,
                        "threads": threads,
                        "wait": wait,
                        "idle_tok_s": idle,
                        "busy_tok_s": busy,
                    }
                )
                print(
                    f"| {policy} | {threads} | {wait} | {idle:.2f} | {busy:.2f} | {busy / idle:.0%} |",
                    flush=True,
                )
    if args.out:
        meta = {"command": " ".join(sys.argv), "cores": os.cpu_count(), "busy": args.busy}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
