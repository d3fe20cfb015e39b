"""`tova bench speed`: prefill and decode tokens/s vs context depth, full cache vs bounded policies.

Like llama-bench -d: from an empty cache, prefill `depth` random tokens (pp<depth>, timed, `--pp-reps` times;
bounded policies cut after every `--chunk` tokens), then decode blocks of `--n-gen` tokens one per call
(tg<n> @ d<depth>): one untimed warm-up block, then `--reps` timed blocks back to back (llama-bench
re-prefills for every repetition; here the depth grows by n_gen per block, which keeps a 16k-depth run
affordable on CPU). Figures are mean ± std over the repetitions.
Each (policy, budget, depth) runs in a fresh process, so peak RSS is that configuration's own. KV bytes are
the cells occupied after the run x n_layer x (K row + V row bytes), the row sizes from the GGUF metadata.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import TovaError
from ..session import Session
from . import common

COLUMNS = [
    "model",
    "policy",
    "budget",
    "depth",
    "n_gen",
    "reps",
    "threads",
    "pp_tps",
    "pp_tps_std",
    "tg_tps",
    "tg_tps_std",
    "tg_ms",
    "n_cells",
    "kv_bytes",
    "peak_rss_mib",
]
# bytes per element of the KV cache types Session accepts (block types: block bytes / block elements)


@dataclass
class SpeedResult:
    model: str
    policy: str
    budget: int  # for `full`: the cells it ends with (depth + n_gen x (reps + 1))
    depth: int
    n_gen: int
    reps: int
    threads: int
    pp_tps: float  # prefill tokens/s (nan at depth 0)
    pp_tps_std: float
    tg_tps: float  # decode tokens/s
    tg_tps_std: float
    tg_ms: float  # mean decode ms per token
    n_cells: int  # cells occupied after the run
    kv_bytes: int
    peak_rss_mib: float


def kv_row_bytes(s: Session) -> int:
    """Bytes of one cell's K row + V row over all layers (Session.kv_row_bytes), as a bench error if underived."""
    try:
        return s.kv_row_bytes()
    except ValueError as e:
        raise common.BenchError(str(e)) from None


def measure(
    path: str,
    policy: str,
    budget: int,
    depth: int,
    n_gen: int,
    reps: int,
    threads: int,
    chunk: int,
    pp_reps: int = 1,
    seed: int = 0,
    verbose: bool = False,
) -> dict:
    """One configuration: per-repetition prefill and decode rates, occupied cells and KV bytes.

    Prefill: `pp_reps` times from an empty cache. Decode: after the last prefill, one untimed block of n_gen
    tokens (warm-up) then `reps` timed blocks; the depth grows by n_gen per block (small next to depth)."""
    cells = depth + n_gen * (reps + 1) if policy == "full" else budget
    with Session(
        path,
        budget=cells,
        policy=policy,
        chunk=chunk,
        n_threads=threads,
        verbose=verbose,
        **common.session_kwargs(policy),
    ) as s:
        rng = np.random.default_rng(seed)
        prompt = rng.integers(0, s.n_vocab, size=depth)  # any tokens: speed does not depend on them
        gen = rng.integers(0, s.n_vocab, size=n_gen)
        s.eval(prompt[: min(depth, 2 * chunk)] if depth else gen[:1])  # warm-up, untimed
        pp, tg = [], []
        for _ in range(pp_reps):
            s.reset()
            t0 = time.perf_counter()
            if depth:
                s.eval(prompt)
            pp.append(depth / (time.perf_counter() - t0) if depth else float("nan"))
        for rep in range(reps + 1):
            t0 = time.perf_counter()
            for tok in gen:
                s.eval([tok])
            if rep:  # block 0 is the warm-up
                tg.append(n_gen / (time.perf_counter() - t0))
        n_cells = s.n_occupied
        kv = n_cells * kv_row_bytes(s)
    return {
        "pp": pp,
        "tg": tg,
        "n_cells": n_cells,
        "kv_bytes": int(kv),
        "peak_rss_mib": common.peak_rss_mib(),
    }


def _in_fresh_process(**kw) -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure, **kw).result()


def add_parser(sub) -> None:
    p = sub.add_parser(
        "speed",
        help="prefill/decode tokens/s vs depth (as llama-bench -d), KV bytes, peak RSS",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-d", "--depths", type=common.int_list, default=[1024, 4096, 16384], help="context depths")
    p.add_argument("--budgets", type=common.int_list, default=[1024])
    p.add_argument("-n", "--n-gen", type=common._positive, default=64, help="decoded tokens per repetition")
    p.add_argument(
        "-r", "--reps", type=common._positive, default=3, help="timed decode blocks (after a warm-up)"
    )
    p.add_argument("--pp-reps", type=common._positive, default=1, help="timed prefills from an empty cache")
    p.add_argument("--chunk", type=common._positive, default=256, help="prefill piece (and n_ubatch)")
    p.add_argument(
        "--in-process", action="store_true", help="no fresh process per run (peak RSS is then shared)"
    )
    common.add_common_args(p, out="bench_results/speed")
    p.set_defaults(func=run)


def _std(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def run(args: argparse.Namespace) -> int:
    import llama_cpp

    try:
        path, threads, policies = common.resolve(args)
        with Session(path, budget=1, policy="full", chunk=1, n_threads=threads, verbose=args.verbose) as s:
            size = llama_cpp.llama_model_size(s._model)
            params = llama_cpp.llama_model_n_params(s._model)
        configs = [
            (p, b, d) for d in args.depths for p in policies for b in ([0] if p == "full" else args.budgets)
        ]
        results: list[SpeedResult] = []
        for policy, budget, depth in configs:
            kw = {
                "path": str(path),
                "policy": policy,
                "budget": budget,
                "depth": depth,
                "n_gen": args.n_gen,
                "reps": args.reps,
                "threads": threads,
                "chunk": args.chunk,
                "pp_reps": args.pp_reps,
                "verbose": args.verbose,
            }
            t0 = time.perf_counter()
            m = measure(**kw) if args.in_process else _in_fresh_process(**kw)
            cells = depth + args.n_gen * (args.reps + 1) if policy == "full" else budget
            r = SpeedResult(
                path.name,
                policy,
                cells,
                depth,
                args.n_gen,
                args.reps,
                threads,
                statistics.mean(m["pp"]),
                _std(m["pp"]),
                statistics.mean(m["tg"]),
                _std(m["tg"]),
                1e3 / statistics.mean(m["tg"]),
                m["n_cells"],
                m["kv_bytes"],
                m["peak_rss_mib"],
            )
            results.append(r)
            print(
                f"{policy:>6} B={cells:<6} d={depth:<6} pp {r.pp_tps:8.1f} t/s | tg {r.tg_tps:7.2f} ± "
                f"{r.tg_tps_std:.2f} t/s | KV {r.kv_bytes / 2**20:7.2f} MiB | RSS {r.peak_rss_mib:.0f} MiB "
                f"({time.perf_counter() - t0:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    except TovaError as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = [asdict(r) for r in results]
    out = common.out_dir(args)
    common.write_csv(out / "speed.csv", rows, COLUMNS)
    common.write_json(
        out / "speed.json",
        common.meta(args, path, threads, chunk=args.chunk, model_bytes=size, model_params=params),
        rows,
    )
    print(table(results, size, params))
    print()
    print(checks(results))
    if not args.no_plot:
        plot(results, out / "speed.png")
    print(f"\nwrote {out}/speed.csv, speed.json" + ("" if args.no_plot else ", speed.png"))
    return 0


def _label(r: SpeedResult) -> str:
    return r.policy if r.policy == "full" else f"{r.policy} B={r.budget}"


def table(results: list[SpeedResult], size: int, params: int) -> str:
    rows = []
    for r in results:
        base = [
            r.model,
            f"{size / 2**20:.2f} MiB",
            f"{params / 1e6:.2f} M",
            "CPU",
            str(r.threads),
            r.policy,
            "all" if r.policy == "full" else str(r.budget),
        ]
        tail = [f"{r.kv_bytes / 2**20:.2f}", f"{r.peak_rss_mib:.0f}"]
        if r.depth:
            rows.append([*base, f"pp{r.depth}", f"{r.pp_tps:.2f} ± {r.pp_tps_std:.2f}", *tail])
        rows.append([*base, f"tg{r.n_gen} @ d{r.depth}", f"{r.tg_tps:.2f} ± {r.tg_tps_std:.2f}", *tail])
    header = [
        "model",
        "size",
        "params",
        "backend",
        "threads",
        "policy",
        "budget",
        "test",
        "t/s",
        "KV MiB",
        "peak RSS MiB",
    ]
    return common.markdown_table(rows, header, right={1, 2, 4, 6, 8, 9, 10})


def checks(results: list[SpeedResult]) -> str:
    """The issue's speed targets, evaluated on this run's numbers."""
    lines = []
    by = {(r.policy, r.budget if r.policy != "full" else 0, r.depth): r for r in results}
    for r in results:
        if r.policy == "tova":
            full = by.get(("full", 0, r.depth))
            if full and r.depth >= 4 * r.budget:
                lines.append(
                    f"decode speed-up tova B={r.budget} vs full at d{r.depth}: "
                    f"{r.tg_tps / full.tg_tps:.2f}x (target at d16384, B=1024: >= 3x)"
                )
            window = by.get(("window", r.budget, r.depth))
            if window:
                lines.append(
                    f"per-token cost tova / window, B={r.budget}, d{r.depth}: "
                    f"{r.tg_ms / window.tg_ms:.3f} (target <= 1.10)"
                )
    return "\n".join(lines) or "(no tova/full or tova/window pairs to compare)"


def plot(results: list[SpeedResult], path: Path) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[SpeedResult]] = {}
    for r in results:
        series.setdefault(r.policy if r.policy == "full" else _label(r), []).append(r)
    for label, rs in series.items():
        rs = sorted(rs, key=lambda r: r.depth)
        ax.errorbar(
            [max(r.depth, 1) for r in rs],
            [r.tg_tps for r in rs],
            yerr=[r.tg_tps_std for r in rs],
            marker="o",
            capsize=2,
            label=label,
            linestyle="--" if label == "full" else "-",
        )
    depths = sorted({max(r.depth, 1) for r in results})
    ax.set_xscale("log", base=2)
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.set_xlabel("context depth (tokens)")
    ax.set_ylabel("decode tokens/s")
    r0 = results[0]
    ax.set_title(f"{r0.model}, CPU, {r0.threads} threads: decode tg{r0.n_gen} after depth", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    common.save_figure(fig, path, dpi=110)
    plt.close(fig)
