"""Decode speed of TOVA vs the full cache on a GPU, on synthetic random-weight llamas (speed only: the weights
are random, so the text is noise). Writes the models with gguf.GGUFWriter, then for each model measures decode
tokens/s at several depths (tokens seen before the measured tokens) for:
  full        the whole context in the cache (flash attention on)
  tova B m    TOVA with budget B, evicting every m steps (flash attention on)
  base B      policy 'full' in a context of B cells filled to B tokens: attention over B cells with no TOVA cost.
              The reference for TOVA's overhead at equal budget ('window' is not on this branch).
Every configuration goes through tova_cpp.Session (same Python per-token path), one token per llama_decode, no
sampling. Prints llama-bench style rows: | model | size | params | backend | test | t/s |.

usage: python scripts/bench_gpu.py --out DIR [--models 1b,8b] [--depths 0,4096,16384,32768] [--n-gen 128]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from tova_cpp.bench.synthetic import SHAPES, write_model


def decode_tps(s, rng, n_gen: int) -> float:
    toks = rng.integers(0, s.n_vocab, size=n_gen)
    s.eval([int(toks[0])])  # warm: graph reuse and the first cut after a prompt
    t0 = time.perf_counter()
    for t in toks[1:]:
        s.eval([int(t)])
    return (n_gen - 1) / (time.perf_counter() - t0)


def fill(s, rng, n: int, step: int = 4096) -> None:
    while n > 0:
        k = min(step, n)
        s.eval(rng.integers(0, s.n_vocab, size=k))
        n -= k


def run_model(path: Path, label: str, size_gib: float, params_b: float, args, rows: list) -> None:
    from tova_cpp import Session

    depths = [int(x) for x in args.depths.split(",")]
    budgets = [int(x) for x in args.budgets.split(",")]
    intervals = [int(x) for x in args.intervals.split(",")]
    common = dict(n_gpu_layers=-1, flash_attn=True, chunk=args.chunk, n_threads=4)

    def emit(test, tps, extra=None):
        row = dict(
            model=label, size_gib=size_gib, params_b=params_b, backend=args.backend, test=test, tps=tps
        )
        row.update(extra or {})
        rows.append(row)
        print(
            f"| {label} | {size_gib:.2f} GiB | {params_b:.2f} B | {args.backend} | {test} | {tps:.2f} |"
            + (f" {json.dumps(extra)}" if extra else ""),
            flush=True,
        )

    rng = np.random.default_rng(1)
    # full cache, flash attention on: one session, deepened step by step
    with Session(path, policy="full", budget=max(depths) + args.n_gen + 8, **common) as s:
        seen = 0
        for depth in depths:
            fill(s, rng, depth - seen)
            tps = decode_tps(s, rng, args.n_gen)
            seen = s.n_past
            emit(f"full tg{args.n_gen} @ d{depth}", tps)
    # no-eviction-cost reference at equal budget: B cells, full
    for b in budgets:
        with Session(path, policy="full", budget=b + args.n_gen + 8, **common) as s:
            fill(s, rng, b)
            emit(f"base{b} tg{args.n_gen} @ d{b}", decode_tps(s, rng, args.n_gen))
    for b in budgets:
        for m in intervals:
            with Session(path, policy="tova", budget=b, evict_interval=m, **common) as s:
                seen = 0
                for depth in depths:
                    fill(s, rng, depth - seen)
                    s.engine_stats(reset=True)
                    tps = decode_tps(s, rng, args.n_gen)
                    st = s.engine_stats()
                    seen = s.n_past
                    per = {k: round(v / (args.n_gen) * 1e6, 1) for k, v in st.items() if k.endswith("_s")}
                    emit(
                        f"tova{b} m{m} tg{args.n_gen} @ d{depth}",
                        tps,
                        {"us_per_token": per, "cuts": st["cuts"], "n_kv_cells": s.n_cells},
                    )


def step_suite(path: Path, label: str, args, rows: list) -> None:
    """Issue 10's rows, one process, one run: plain llama-cpp-python `Llama.eval` (no tova) at the cells of the
    `full` session, Session full, window@B, tova@B m=1 and m=8, each after a prompt of `depth` random tokens;
    tokens/s over n_gen single-token evals after 8 warm-up tokens, logits read every token. Prints ratios."""
    import llama_cpp

    from tova_cpp import Session

    rng = np.random.default_rng(1)
    warm = 8
    fa = args.fa == 1
    common = dict(n_gpu_layers=args.ngl, flash_attn=fa, chunk=args.chunk, n_threads=4)

    def timed(step) -> float:
        toks = rng.integers(10, 1000, size=args.n_gen + warm).tolist()
        for t in toks[:warm]:
            step(t)
        t0 = time.perf_counter()
        for t in toks[warm:]:
            step(t)
        return args.n_gen / (time.perf_counter() - t0)

    def emit(test, tps, backend, extra=None):
        row = dict(model=label, backend=backend, test=test, tps=tps, ms=1e3 / tps, **(extra or {}))
        rows.append(row)
        print(
            f"| {label} | {backend} | {test} | {tps:.2f} | {1e3 / tps:.3f} |"
            + (f" {json.dumps(extra)}" if extra else ""),
            flush=True,
        )

    def session(policy, budget, depth, m=1):
        with Session(path, policy=policy, budget=budget, evict_interval=m, **common) as s:
            fill(s, rng, depth)
            s.engine_stats(reset=True)

            def step(t):
                s.eval([t])
                s.logits()

            tps = timed(step)
            st = s.engine_stats()
            per = {k: round(v / (args.n_gen + warm) * 1e6, 1) for k, v in st.items() if k.endswith("_s")}
            return (
                tps,
                s.cache_buffer or device,
                s.n_cells,
                {"us_per_token": per, "cuts": st["cuts"], "cells": s.n_cells},
            )

    # the device that holds the cache, as the engine sees it (full/window sessions run without the eval
    # callback, so they do not see the cache tensors): a small tova session of the same build and flags
    with Session(path, policy="tova", budget=64, **common) as probe:
        probe.eval([1, 2, 3])
        device = probe.cache_buffer

    for depth, budget in (
        (args.depth, args.budget),
        *(((args.deep, args.deep_budget),) if args.deep else ()),
    ):
        full_budget = depth + args.n_gen + warm + 8
        tps_full, buf, n_cells, _ = session("full", full_budget, depth)
        llm = llama_cpp.Llama(
            str(path),
            n_gpu_layers=args.ngl,
            flash_attn=fa,
            n_ctx=n_cells,
            n_batch=args.chunk,
            n_ubatch=args.chunk,
            n_threads=4,
            verbose=False,
        )
        fill_plain = rng.integers(10, 1000, size=depth).tolist()
        llm.eval(fill_plain)

        tps_plain = timed(lambda t, llm=llm: llm.eval([t]))
        llm.close()
        emit(f"plain tg{args.n_gen} @ d{depth} ({n_cells} cells)", tps_plain, buf)
        emit(
            f"full tg{args.n_gen} @ d{depth} ({n_cells} cells)",
            tps_full,
            buf,
            {"vs_plain": round(tps_full / tps_plain, 3)},
        )
        tw, bw, _, xw = session("window", budget, depth)
        emit(
            f"window{budget} tg{args.n_gen} @ d{depth}",
            tw,
            bw,
            {**xw, "vs_plain_full": round(tw / tps_plain, 3)},
        )
        for m in (1, 8):
            tt, bt, _, xt = session("tova", budget, depth, m)
            xt.update(time_vs_window=round(tw / tt, 3), vs_full=round(tt / tps_full, 3))
            emit(f"tova{budget} m{m} tg{args.n_gen} @ d{depth}", tt, bt, xt)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for the models and results.json")
    ap.add_argument("--models", default="1b,8b")
    ap.add_argument("--depths", default="0,4096,16384,32768")
    ap.add_argument("--budgets", default="512,2048")
    ap.add_argument("--intervals", default="1,8")
    ap.add_argument("--n-gen", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=256, help="prompt chunk (= n_ubatch) for every session")
    ap.add_argument("--backend", default="CUDA", help="label for the backend column")
    ap.add_argument("--step", action="store_true", help="issue 10's suite (plain/full/window/tova) instead")
    ap.add_argument("--depth", type=int, default=512, help="--step: depth of the equal-budget rows")
    ap.add_argument("--budget", type=int, default=512, help="--step: budget of the equal-budget rows")
    ap.add_argument("--deep", type=int, default=0, help="--step: also rows at this depth (e.g. 32768)")
    ap.add_argument("--deep-budget", type=int, default=2048)
    ap.add_argument("--ngl", type=int, default=-1)
    ap.add_argument("--fa", type=int, default=1)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list = []
    print(
        "| model | size | params | backend | test | t/s |\n| --- | --- | --- | --- | --- | --- |", flush=True
    )
    for name in args.models.split(","):
        path = args.out / f"synthetic-{name}.gguf"
        t0 = time.perf_counter()
        if not path.exists():
            write_model(path, name)
        sh = SHAPES[name]
        size = path.stat().st_size / 2**30
        d, L, ff, V = sh["n_embd"], sh["n_layer"], sh["n_ff"], sh["n_vocab"]
        kv = sh["n_head_kv"] * d // sh["n_head"]
        params = (2 * V * d + L * (2 * d * d + 2 * kv * d + 3 * d * ff)) / 1e9
        print(f"# wrote {path.name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        label = f"llama {name} {sh['wtype'].upper()} (random)"
        if args.step:
            step_suite(path, label, args, rows)
        else:
            run_model(path, label, size, params, args, rows)
        (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
