"""`tova bench speed`: prefill and decode tokens/s vs context depth, full cache vs bounded policies.

Like llama-bench -d: from an empty cache, prefill `depth` random tokens (pp<depth>, timed, `--pp-reps` times;
bounded policies cut after every `--chunk` tokens), then decode blocks of `--n-gen` tokens one per call
(tg<n> @ d<depth>): one untimed warm-up block, then `--reps` timed blocks back to back (llama-bench
re-prefills for every repetition; here the depth grows by n_gen per block, which keeps a 16k-depth run
affordable on CPU). Figures are mean ± std over the repetitions.
Each (policy, budget, depth) runs in a fresh process, so peak RSS is that configuration's own. KV bytes are
the cells occupied after the run x n_layer x (K row + V row bytes), the row sizes from the GGUF metadata.
GPUs: -ngl, -fa, -ctk/-ctv and --evict-interval as llama-bench names them; --plain adds a row of
llama-cpp-python's own `Llama.eval` (no tova) at the cells of `full`; the backend column is the buffer that
held the K cache (full/window/sink run without the engine's eval callback and report the device their
llama.cpp build offloads to: "CPU" with -ngl 0). --synthetic 1b|8b writes a random-weight model of that shape
(tova_cpp.bench.synthetic, needs gguf) into the output folder and measures it.
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
    "backend",
    "n_gpu_layers",
    "flash_attn",
    "type_k",
    "type_v",
    "evict_interval",
    "pp_tps",
    "pp_tps_std",
    "tg_tps",
    "tg_tps_std",
    "tg_ms",
    "capture_us",
    "score_us",
    "cut_us",
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
    backend: str  # the buffer that held the K cache ("CPU", "CUDA0", ...)
    n_gpu_layers: int
    flash_attn: bool
    type_k: str
    type_v: str
    evict_interval: int
    pp_tps: float  # prefill tokens/s (nan at depth 0)
    pp_tps_std: float
    tg_tps: float  # decode tokens/s
    tg_tps_std: float
    tg_ms: float  # mean decode ms per token
    capture_us: float  # engine time per timed decode token (engine_stats): the eval callback's reads,
    score_us: float  # the flash-attention scoring graph,
    cut_us: float  # choosing, syncing, moving rows, removing metadata (nan for plain)
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
    n_gpu_layers: int = 0,
    flash_attn: bool = False,
    type_k: str = "f16",
    type_v: str = "f16",
    evict_interval: int = 1,
) -> dict:
    """One configuration: per-repetition prefill and decode rates, occupied cells and KV bytes.

    Prefill: `pp_reps` times from an empty cache. Decode: after the last prefill, one untimed block of n_gen
    tokens (warm-up) then `reps` timed blocks; the depth grows by n_gen per block (small next to depth)."""
    if policy == "plain":
        return _measure_plain(
            path,
            depth,
            n_gen,
            reps,
            threads,
            chunk,
            pp_reps,
            seed,
            verbose,
            n_gpu_layers,
            flash_attn,
            type_k,
            type_v,
        )
    cells = depth + n_gen * (reps + 1) if policy == "full" else budget
    with Session(
        path,
        budget=cells,
        policy=policy,
        chunk=chunk,
        n_threads=threads,
        verbose=verbose,
        n_gpu_layers=n_gpu_layers,
        flash_attn=flash_attn,
        type_k=type_k,
        type_v=type_v,
        evict_interval=evict_interval if policy != "full" else 1,
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
            else:
                s.engine_stats(reset=True)
        stats = s.engine_stats()
        n_cells = s.n_occupied
        kv = n_cells * kv_row_bytes(s)
        backend = s.cache_buffer or _offload_device(n_gpu_layers)
    return {
        "pp": pp,
        "tg": tg,
        "n_cells": n_cells,
        "kv_bytes": int(kv),
        "peak_rss_mib": common.peak_rss_mib(),
        "backend": backend,
        **{f"{k}_us": stats[f"{k}_s"] * 1e6 / (n_gen * reps) for k in ("capture", "score", "cut")},
    }


def _offload_device(n_gpu_layers: int) -> str:
    """Where llama.cpp puts offloaded layers when the engine did not see the cache (no eval callback)."""
    import llama_cpp

    if n_gpu_layers == 0 or not llama_cpp.llama_supports_gpu_offload():
        return "CPU"
    return "GPU (offloaded)"


def _measure_plain(
    path, depth, n_gen, reps, threads, chunk, pp_reps, seed, verbose, n_gpu_layers, flash_attn, type_k, type_v
) -> dict:
    """llama-cpp-python's own Llama.eval, no tova, the same protocol and cells as `full`."""
    import llama_cpp

    from ..session import CACHE_TYPES

    cells = depth + n_gen * (reps + 1)
    llm = llama_cpp.Llama(
        str(path),
        n_gpu_layers=n_gpu_layers,
        flash_attn=flash_attn,
        n_ctx=cells + chunk,
        n_batch=chunk,
        n_ubatch=chunk,
        n_threads=threads,
        type_k=CACHE_TYPES[type_k],
        type_v=CACHE_TYPES[type_v],
        verbose=verbose,
    )
    try:
        rng = np.random.default_rng(seed)
        prompt = rng.integers(0, llm.n_vocab(), size=depth).tolist()
        gen = rng.integers(0, llm.n_vocab(), size=n_gen).tolist()
        pp, tg = [], []
        for _ in range(pp_reps):
            llm.reset()  # the next eval removes every cell past n_tokens = 0
            t0 = time.perf_counter()
            if depth:
                llm.eval(prompt)
            pp.append(depth / (time.perf_counter() - t0) if depth else float("nan"))
        for rep in range(reps + 1):
            t0 = time.perf_counter()
            for tok in gen:
                llm.eval([tok])
            if rep:
                tg.append(n_gen / (time.perf_counter() - t0))
        n_cells = llm.n_tokens
    finally:
        llm.close()
    return {
        "pp": pp,
        "tg": tg,
        "n_cells": n_cells,
        "kv_bytes": 0,
        "peak_rss_mib": common.peak_rss_mib(),
        "backend": _offload_device(n_gpu_layers),
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
    common.add_ngl_arg(p)
    p.add_argument("-fa", "--flash-attn", type=int, choices=(0, 1), default=0, help="flash attention")
    p.add_argument("-ctk", "--cache-type-k", default="f16", help="K cache type (f16, f32, bf16, q8_0, q4_0)")
    p.add_argument("-ctv", "--cache-type-v", default="f16", help="V cache type (quantized needs -fa 1)")
    p.add_argument(
        "--evict-interval", type=common._positive, default=1, help="cut every m tokens (m = 1: paper)"
    )
    p.add_argument("--plain", action="store_true", help="add llama-cpp-python's Llama.eval (no tova) rows")
    p.add_argument(
        "--synthetic",
        choices=("1b", "8b"),
        default=None,
        help="write and measure a random-weight model of this shape (needs gguf)",
    )
    common.add_common_args(p, out="bench_results/speed")
    p.set_defaults(func=run)


def _std(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def run(args: argparse.Namespace) -> int:
    import llama_cpp

    try:
        if args.synthetic:
            from .synthetic import write_model

            synthetic = common.out_dir(args) / f"synthetic-{args.synthetic}.gguf"
            if not synthetic.exists():
                write_model(synthetic, args.synthetic)
            args.model = str(synthetic)
        path, threads, policies = common.resolve(args)
        if args.plain:
            policies = ["plain", *policies]
        with Session(path, budget=1, policy="full", chunk=1, n_threads=threads, verbose=args.verbose) as s:
            size = llama_cpp.llama_model_size(s._model)
            params = llama_cpp.llama_model_n_params(s._model)
        configs = [
            (p, b, d)
            for d in args.depths
            for p in policies
            for b in ([0] if p in ("full", "plain") else args.budgets)
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
                "n_gpu_layers": args.n_gpu_layers,
                "flash_attn": bool(args.flash_attn),
                "type_k": args.cache_type_k,
                "type_v": args.cache_type_v,
                "evict_interval": args.evict_interval,
            }
            t0 = time.perf_counter()
            m = measure(**kw) if args.in_process else _in_fresh_process(**kw)
            cells = depth + args.n_gen * (args.reps + 1) if policy in ("full", "plain") else budget
            r = SpeedResult(
                path.name,
                policy,
                cells,
                depth,
                args.n_gen,
                args.reps,
                threads,
                m["backend"],
                args.n_gpu_layers,
                bool(args.flash_attn),
                args.cache_type_k,
                args.cache_type_v,
                args.evict_interval if policy not in ("full", "plain") else 1,
                statistics.mean(m["pp"]),
                _std(m["pp"]),
                statistics.mean(m["tg"]),
                _std(m["tg"]),
                1e3 / statistics.mean(m["tg"]),
                m.get("capture_us", float("nan")),
                m.get("score_us", float("nan")),
                m.get("cut_us", float("nan")),
                m["n_cells"],
                m["kv_bytes"],
                m["peak_rss_mib"],
            )
            results.append(r)
            print(
                f"{policy:>6} B={cells:<6} d={depth:<6} pp {r.pp_tps:8.1f} t/s | tg {r.tg_tps:7.2f} ± "
                f"{r.tg_tps_std:.2f} t/s | us/token capture {r.capture_us:.0f} score {r.score_us:.0f} "
                f"cut {r.cut_us:.0f} | KV {r.kv_bytes / 2**20:7.2f} MiB | RSS {r.peak_rss_mib:.0f} MiB "
                f"({time.perf_counter() - t0:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    except TovaError as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = common.out_dir(args)
    common.write_results(
        out,
        "speed",
        [asdict(r) for r in results],
        COLUMNS,
        common.meta(args, path, threads, chunk=args.chunk, model_bytes=size, model_params=params),
    )
    print(table(results, size, params))
    print()
    print(checks(results))
    if not args.no_plot:
        plot(results, out / "speed.png")
    print(f"\nwrote {out}/speed.csv, speed.json" + ("" if args.no_plot else ", speed.png"))
    return 0


def _label(r: SpeedResult) -> str:
    return r.policy if r.policy in ("full", "plain") else f"{r.policy} B={r.budget}"


def table(results: list[SpeedResult], size: int, params: int) -> str:
    rows = []
    for r in results:
        base = [
            r.model,
            f"{size / 2**20:.2f} MiB",
            f"{params / 1e6:.2f} M",
            r.backend,
            str(r.threads),
            r.policy,
            "all" if r.policy in ("full", "plain") else str(r.budget),
        ]
        tail = [
            str(r.n_gpu_layers),
            str(int(r.flash_attn)),
            r.type_k,
            r.type_v,
            str(r.evict_interval),
            f"{r.kv_bytes / 2**20:.2f}",
            f"{r.peak_rss_mib:.0f}",
        ]
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
        "ngl",
        "fa",
        "type_k",
        "type_v",
        "m",
        "KV MiB",
        "peak RSS MiB",
    ]
    return common.markdown_table(rows, header, right={1, 2, 4, 6, 8, 9, 10, 13, 14, 15})


def window_target(r: SpeedResult) -> float:
    """TOVA's allowed per-token cost over window's: 1.10 on a CPU; offloaded, 1.25 at evict_interval 1 (the
    paper's per-token cut) and 1.05 at larger intervals (docs/RESULTS-GPU.md)."""
    if r.n_gpu_layers == 0:
        return 1.10
    return 1.25 if r.evict_interval == 1 else 1.05


def checks(results: list[SpeedResult]) -> str:
    """The issue's speed targets, evaluated on this run's numbers."""
    lines = []
    by = {(r.policy, r.budget if r.policy not in ("full", "plain") else 0, r.depth): r for r in results}
    for r in results:
        plain = by.get(("plain", 0, r.depth))
        if plain and r.policy == "full":
            lines.append(
                f"full / plain tokens/s at d{r.depth}: {r.tg_tps / plain.tg_tps:.3f} (target >= 0.97)"
            )
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
                    f"{r.tg_ms / window.tg_ms:.3f} (target <= {window_target(r):.2f})"
                )
    return "\n".join(lines) or "(no tova/full or tova/window pairs to compare)"


def plot(results: list[SpeedResult], path: Path) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[SpeedResult]] = {}
    for r in results:
        series.setdefault(_label(r), []).append(r)
    for label, rs in series.items():
        rs = sorted(rs, key=lambda r: r.depth)
        ax.errorbar(
            [max(r.depth, 1) for r in rs],
            [r.tg_tps for r in rs],
            yerr=[r.tg_tps_std for r in rs],
            marker="o",
            capsize=2,
            label=label,
            linestyle="--" if label in ("full", "plain") else "-",
        )
    depths = sorted({max(r.depth, 1) for r in results})
    ax.set_xscale("log", base=2)
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.set_xlabel("context depth (tokens)")
    ax.set_ylabel("decode tokens/s")
    r0 = results[0]
    ax.set_title(
        f"{r0.model}, {r0.backend}, {r0.threads} threads: decode tg{r0.n_gen} after depth", fontsize=9
    )
    ax.set_ylim(bottom=0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    common.save_figure(fig, path, dpi=110)
    plt.close(fig)
