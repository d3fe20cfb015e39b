"""`tova bench batch`: the paper's throughput experiment. For a fixed KV memory, how many sequences fit and
their aggregate decode tokens/s, full cache vs bounded policies (tova_cpp.batch.BatchSession).

The KV memory is that of `--full-seqs` full-cache sequences of `--context` tokens: M = full_seqs x context
cells. Full cache: `full_seqs` sequences, each reserving `context` cells, prefilled to context - decoded tokens,
then decoded together to `context`. Policy P at budget B: as many sequences as M holds at B + max(chunk,
evict_interval) cells each (at most --max-seqs and llama.cpp's 256 sequence ids), each prefilled with B + chunk
random tokens (one piece, one cut: a bounded sequence then holds B to B + evict_interval - 1 cells, as it does at
any depth, so its decode costs what it costs at the end of a `context`-token conversation), then decoded
together. `--seqs 1,8` measures those sequence counts instead of "as many as fit" (the CPU figure: 8 sequences
vs 1 at one budget). Decode: one untimed warm-up block of --n-gen steps, then --reps timed blocks; each step is
one BatchSession.step carrying one token of every sequence. Figures: mean ± std over the blocks.
The decode steps run with logits=False by default, like llama-batched-bench (llama.cpp computes the last token's
logits of every sequence, nobody copies them out); --logits 1 copies every sequence's row into the step's
result as a sampling loop needs (n_seqs x n_vocab floats per step). The table says which ("logits" column).
Per-step split (CSV/JSON, and one line per configuration on stderr): engine_ms (inside the C step), decode_ms
(llama_decode and the wait for its graph), capture/score/cut (score: build/compute/read-back; cut:
choose/move), logits_ms, python_ms (BatchSession.step outside the C call and the benchmark loop).
GPU flags as `tova bench speed`: -ngl, -fa, -ctk/-ctv, --evict-interval, --synthetic 1b|8b.
--kv-unified 1 keeps every sequence in one unified KV cache (attention over all sequences' cells, the others'
masked); 0 gives each sequence its own stream (attention over its own cells only), which llama.cpp rounds up to
a multiple of 256 cells: a sequence then takes PAD256(B + max(chunk, evict_interval)) cells of M.
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
from . import common

# the per-step split measure() returns and BatchResult ends with (ms per timed step unless noted)
SPLIT = (
    "engine_ms",
    "decode_ms",
    "logits_ms",
    "python_ms",
    "score_builds",
    "score_build_ms",
    "score_compute_ms",
    "score_read_ms",
    "score_per_scored_ms",
    "choose_ms",
    "move_ms",
    "decode_unscored_ms",
    "decode_scored_ms",
)

COLUMNS = [
    "model",
    "policy",
    "budget",
    "context",
    "n_seqs",
    "cells_per_seq",
    "kv_cells",
    "kv_bytes",
    "threads",
    "backend",
    "n_gpu_layers",
    "flash_attn",
    "kv_unified",
    "type_k",
    "type_v",
    "evict_interval",
    "chunk",
    "n_gen",
    "reps",
    "tg_tps",
    "tg_tps_std",
    "step_ms",
    "per_seq_tps",
    "speedup",
    "prefill_s",
    "capture_ms",
    "score_ms",
    "cut_ms",
    "peak_rss_mib",
    "logits",
    *SPLIT,
]


@dataclass
class BatchResult:
    model: str
    policy: str
    budget: int  # full: the context
    context: int
    n_seqs: int
    cells_per_seq: int  # cells each sequence reserves (per-sequence streams: its stream, padded to 256)
    kv_cells: int  # the context's cells (the fixed KV memory, padded to 256)
    kv_bytes: int  # kv_cells x K+V row bytes over all layers
    threads: int
    backend: str
    n_gpu_layers: int
    flash_attn: bool
    kv_unified: bool
    type_k: str
    type_v: str
    evict_interval: int
    chunk: int
    n_gen: int
    reps: int
    tg_tps: float  # aggregate decode tokens/s (all sequences)
    tg_tps_std: float
    step_ms: float  # one batched step (one token of every sequence)
    per_seq_tps: float
    speedup: float  # tg_tps / the full cache's (or / the first row's when there is no full row)
    prefill_s: float
    capture_ms: float  # per timed step: the eval callback's data phase (engine_stats)
    score_ms: float  # per timed step: the flash-attention scoring graph
    cut_ms: float  # per timed step: choosing, moving rows, removing metadata
    peak_rss_mib: float
    logits: bool  # the decode steps copied every sequence's logits (--logits 1)
    engine_ms: float  # per timed step: inside tova_engine_decode_batch
    decode_ms: float  # per timed step: llama_decode and the wait for its graph (contains capture_ms)
    logits_ms: float  # per timed step: reading (and with --logits 1 copying) the logits rows
    python_ms: float  # per timed step: everything outside the C call (arguments, result, the loop)
    score_builds: int  # scoring graphs built during the timed steps
    score_build_ms: float  # per timed step: parts of score_ms
    score_compute_ms: float
    score_read_ms: float
    score_per_scored_ms: float  # score_ms of one scored step (score_s / scored decodes)
    choose_ms: float  # per timed step: parts of cut_ms
    move_ms: float
    decode_unscored_ms: (
        float  # one llama_decode that scores nothing (no callback sync; vs llama-batched-bench)
    )
    decode_scored_ms: float  # one llama_decode that scores (its per-layer callback syncs included)


def measure(
    path: str,
    policy: str,
    budget: int,
    context: int,
    kv_cells: int,
    n_seqs: int | None,
    max_seqs: int,
    n_gen: int,
    reps: int,
    threads: int,
    chunk: int,
    n_gpu_layers: int,
    flash_attn: bool,
    type_k: str,
    type_v: str,
    evict_interval: int,
    kv_unified: bool = True,
    verbose: bool = False,
    logits: bool = False,
    plain: bool = False,
) -> dict:
    """One configuration in one BatchSession of kv_cells cells: prefill, warm-up, timed decode blocks.
    plain: llama.cpp alone (no tova) with the configuration's sequences, cells and prompt instead."""
    from ..batch import BatchSession

    full = policy == "full"
    ev = 1 if full else evict_interval
    # full: budget + chunk = context cells per sequence; bounded: budget + max(chunk, ev)
    b = context - chunk if full else budget
    per_seq = b + max(chunk, ev)
    if not kv_unified:  # llama.cpp rounds each sequence's stream up to a multiple of 256 cells
        per_seq = -(-per_seq // 256) * 256
    fit = min(kv_cells // per_seq, max_seqs, 256)
    if fit < 1:
        raise common.BenchError(
            f"{policy} B={budget}: one sequence of {per_seq} cells exceeds {kv_cells} cells"
        )
    n = fit if n_seqs is None else n_seqs
    if n > fit:
        raise common.BenchError(f"{policy} B={budget}: {n} sequences do not fit ({fit} do)")
    prompt = context - n_gen * (reps + 1) if full else b + chunk
    if plain:
        return _measure_plain(
            path,
            n,
            prompt,
            per_seq,
            kv_cells if kv_unified else n * per_seq,
            n_gen,
            reps,
            threads,
            chunk,
            n_gpu_layers,
            flash_attn,
            type_k,
            type_v,
            kv_unified,
            verbose,
            logits,
        )
    with BatchSession(
        path,
        n_seq_max=n,
        n_ctx=kv_cells if kv_unified else n * per_seq,
        budget=b,
        policy=policy,
        evict_interval=ev,
        chunk=chunk,
        n_ubatch=max(chunk, n, 256),
        n_threads=threads,
        n_gpu_layers=n_gpu_layers,
        flash_attn=flash_attn,
        type_k=type_k,
        type_v=type_v,
        kv_unified=kv_unified,
        verbose=verbose,
    ) as bs:
        rng = np.random.default_rng(0)
        seqs = [bs.add() for _ in range(n)]
        t0 = time.perf_counter()
        bs.step({s: rng.integers(0, bs.n_vocab, prompt).tolist() for s in seqs})
        prefill_s = time.perf_counter() - t0
        tg, wall = [], 0.0
        for rep in range(reps + 1):
            if rep == 1:
                bs.engine_stats(reset=True)
            toks = rng.integers(0, bs.n_vocab, (n_gen, n)).tolist()
            # the steps' mappings, built before the clock starts
            batches = [{s: [row[j]] for j, s in enumerate(seqs)} for row in toks]
            t0 = time.perf_counter()
            for batch in batches:
                bs.step(batch, logits=logits)
            dt = time.perf_counter() - t0
            if rep:  # block 0 is the warm-up
                wall += dt
                tg.append(n * n_gen / dt)
        try:
            row = bs.kv_row_bytes()
        except ValueError:
            row = 0
        backend = ""
        from .._ffi import ffi, lib

        backend = ffi.string(lib.tova_engine_cache_buffer(bs._engine)).decode() or (
            "CPU" if n_gpu_layers == 0 else "GPU (offloaded)"
        )
        n_cells = bs.n_cells
        stats = bs.engine_stats()
    steps = n_gen * reps
    per = {k: 1e3 * stats[k] / steps for k in stats if k.endswith("_s")}
    return {
        "capture_ms": per["capture_s"],
        "score_ms": per["score_s"],
        "cut_ms": per["cut_s"],
        "engine_ms": per["step_s"],
        "decode_ms": per["decode_s"],
        "logits_ms": per["logits_s"],
        "python_ms": 1e3 * wall / steps - per["step_s"],
        "score_builds": int(stats["score_builds"]),
        "score_build_ms": per["score_build_s"],
        "score_compute_ms": per["score_compute_s"],
        "score_read_ms": per["score_read_s"],
        "score_per_scored_ms": 1e3 * stats["score_s"] / max(1.0, stats["scored_decodes"]),
        "choose_ms": per["choose_s"],
        "move_ms": per["move_s"],
        "decode_unscored_ms": 1e3
        * (stats["decode_s"] - stats["scored_decode_s"])
        / max(1.0, stats["decodes"] - stats["scored_decodes"]),
        "decode_scored_ms": 1e3 * stats["scored_decode_s"] / max(1.0, stats["scored_decodes"]),
        "tg": tg,
        "n_seqs": n,
        "cells_per_seq": per_seq,
        "kv_cells": n_cells,
        "kv_bytes": n_cells * row,
        "prefill_s": prefill_s,
        "backend": backend,
        "peak_rss_mib": common.peak_rss_mib(),
    }


def _measure_plain(
    path, n, prompt, per_seq, n_ctx, n_gen, reps, threads, chunk, n_gpu_layers, flash_attn, type_k, type_v,
    kv_unified, verbose, logits,
) -> dict:  # fmt: skip
    """llama.cpp alone, as llama-batched-bench runs it: n sequences of `prompt` random tokens in a context of
    n_ctx cells, then each step one token of every sequence in one llama_decode (every sequence's logits computed;
    copied out only with `logits`). The same protocol as measure(), without the engine."""
    import llama_cpp

    from ..session import CACHE_TYPES, guard_cuda_graphs, load_model

    guard_cuda_graphs(n_gpu_layers, many_sequences=True)  # the same CUDA graph setting as a BatchSession's
    model = load_model(Path(path), n_gpu_layers, verbose)
    cp = llama_cpp.llama_context_default_params()
    n_ub = max(chunk, n, 256)
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, n_ub, n_ub, n
    cp.n_threads = cp.n_threads_batch = threads
    cp.kv_unified = kv_unified
    cp.flash_attn_type = 1 if flash_attn else 0
    cp.type_k, cp.type_v = CACHE_TYPES[type_k], CACHE_TYPES[type_v]
    ctx = llama_cpp.llama_init_from_model(model, cp)
    batch = llama_cpp.llama_batch_init(n_ub, 0, 1) if ctx else None
    try:
        if not ctx:
            raise common.BenchError(
                f"llama.cpp could not create a context of {n_ctx} cells for {n} sequences"
            )
        n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))

        def decode(items) -> None:  # (seq, pos, token, output)
            batch.n_tokens = len(items)
            for i, (s, p, t, o) in enumerate(items):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, p, 1, o
                batch.seq_id[i][0] = s
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise common.BenchError("llama_decode failed in the plain run")

        rng = np.random.default_rng(0)
        t0 = time.perf_counter()
        for s in range(n):
            toks = rng.integers(0, n_vocab, prompt).tolist()
            for a in range(0, prompt, n_ub):
                decode([(s, a + i, t, a + i == prompt - 1) for i, t in enumerate(toks[a : a + n_ub])])
        llama_cpp.llama_synchronize(ctx)
        prefill_s = time.perf_counter() - t0
        tg, pos = [], prompt
        for rep in range(reps + 1):
            toks = rng.integers(0, n_vocab, (n_gen, n))
            steps = [[(s, pos + i, int(toks[i, s]), True) for s in range(n)] for i in range(n_gen)]
            t0 = time.perf_counter()
            for items in steps:
                decode(items)
                if logits:
                    np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(n, n_vocab)).copy()
            llama_cpp.llama_synchronize(ctx)
            if rep:  # block 0 is the warm-up
                tg.append(n * n_gen / (time.perf_counter() - t0))
            pos += n_gen
    finally:
        if batch is not None:
            llama_cpp.llama_batch_free(batch)
        if ctx:
            llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    return {
        **dict.fromkeys(("capture_ms", "score_ms", "cut_ms", *SPLIT), float("nan")),
        "score_builds": 0,
        "tg": tg,
        "n_seqs": n,
        "cells_per_seq": per_seq,
        "kv_cells": n_ctx,
        "kv_bytes": 0,
        "prefill_s": prefill_s,
        "backend": "CPU" if n_gpu_layers == 0 else "GPU (offloaded)",
        "peak_rss_mib": common.peak_rss_mib(),
    }


def _in_fresh_process(**kw) -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure, **kw).result()


def add_parser(sub) -> None:
    p = sub.add_parser(
        "batch",
        help="sequences that fit in a fixed KV memory and their aggregate decode tokens/s (many sequences)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--context", type=common._positive, default=4096, help="tokens of a full-cache sequence")
    p.add_argument(
        "--full-seqs", type=common._positive, default=16, help="KV memory = this many full sequences"
    )
    p.add_argument("--budgets", type=common.int_list, default=[512, 1024], help="bounded policies' budgets")
    p.add_argument(
        "--seqs",
        type=common.int_list,
        default=None,
        help="sequence counts to measure (default: as many as fit)",
    )
    p.add_argument("--max-seqs", type=common._positive, default=256, help="at most this many sequences")
    p.add_argument("-n", "--n-gen", type=common._positive, default=32, help="decode steps per block")
    p.add_argument(
        "-r", "--reps", type=common._positive, default=2, help="timed decode blocks (after a warm-up)"
    )
    p.add_argument("--chunk", type=common._positive, default=64, help="prefill piece of a bounded sequence")
    p.add_argument("--in-process", action="store_true", help="no fresh process per configuration")
    p.add_argument(
        "--plain",
        action="store_true",
        help="after each configuration, a row of llama.cpp alone (no tova) with its sequences, cells and prompt",
    )
    p.add_argument(
        "--logits",
        type=int,
        choices=(0, 1),
        default=0,
        help="1: each decode step copies every sequence's logits out (as sampling does); 0: llama-batched-bench's way",
    )
    common.add_ngl_arg(p)
    p.add_argument("-fa", "--flash-attn", type=int, choices=(0, 1), default=0, help="flash attention")
    p.add_argument("-ctk", "--cache-type-k", default="f16", help="K cache type (f16, f32, bf16, q8_0, q4_0)")
    p.add_argument("-ctv", "--cache-type-v", default="f16", help="V cache type (quantized needs -fa 1)")
    p.add_argument(
        "--evict-interval", type=common._positive, default=1, help="cut every m tokens (m = 1: paper)"
    )
    p.add_argument(
        "--kv-unified",
        type=int,
        choices=(0, 1),
        default=0,
        help="1: one KV cache shared by all sequences; 0: a stream per sequence (attention over its own cells)",
    )
    p.add_argument(
        "--synthetic",
        choices=("1b", "8b"),
        default=None,
        help="write and measure a random-weight model of this shape (needs gguf)",
    )
    common.add_common_args(p, out="bench_results/batch")
    p.set_defaults(func=run, policies=None)


def _std(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def run(args: argparse.Namespace) -> int:
    try:
        if args.synthetic:
            from .synthetic import write_model

            synthetic = common.out_dir(args) / f"synthetic-{args.synthetic}.gguf"
            if not synthetic.exists():
                write_model(synthetic, args.synthetic)
            args.model = str(synthetic)
        if args.policies is None:
            args.policies = ["full", "tova"]
        path, threads, policies = common.resolve(args)
        kv_cells = args.full_seqs * args.context
        configs = [(p, b) for p in policies for b in ([args.context] if p == "full" else args.budgets)]
        # --plain: after each configuration, llama.cpp alone with its sequences, cells and prompt
        runs = [(p, b, plain) for p, b in configs for plain in ((False, True) if args.plain else (False,))]
        results: list[BatchResult] = []
        for policy, budget, plain in runs:
            for n_seqs in args.seqs or [None]:
                kw = {
                    "plain": plain,
                    "path": str(path),
                    "policy": policy,
                    "budget": budget,
                    "context": args.context,
                    "kv_cells": kv_cells,
                    "n_seqs": n_seqs,
                    "max_seqs": args.max_seqs,
                    "n_gen": args.n_gen,
                    "reps": args.reps,
                    "threads": threads,
                    "chunk": args.chunk,
                    "n_gpu_layers": args.n_gpu_layers,
                    "flash_attn": bool(args.flash_attn),
                    "type_k": args.cache_type_k,
                    "type_v": args.cache_type_v,
                    "evict_interval": args.evict_interval,
                    "kv_unified": bool(args.kv_unified),
                    "verbose": args.verbose,
                    "logits": bool(args.logits),
                }
                t0 = time.perf_counter()
                m = measure(**kw) if args.in_process else _in_fresh_process(**kw)
                tps = statistics.mean(m["tg"])
                r = BatchResult(
                    path.name,
                    "plain" if plain else policy,
                    budget,
                    args.context,
                    m["n_seqs"],
                    m["cells_per_seq"],
                    m["kv_cells"],
                    m["kv_bytes"],
                    threads,
                    m["backend"],
                    args.n_gpu_layers,
                    bool(args.flash_attn),
                    bool(args.kv_unified),
                    args.cache_type_k,
                    args.cache_type_v,
                    1 if policy == "full" or plain else args.evict_interval,
                    args.chunk,
                    args.n_gen,
                    args.reps,
                    tps,
                    _std(m["tg"]),
                    1e3 * m["n_seqs"] / tps,
                    tps / m["n_seqs"],
                    float("nan"),
                    m["prefill_s"],
                    m["capture_ms"],
                    m["score_ms"],
                    m["cut_ms"],
                    m["peak_rss_mib"],
                    bool(args.logits),
                    *(m[k] for k in SPLIT),
                )
                results.append(r)
                print(
                    f"{r.policy:>6} B={budget:<6} seqs={r.n_seqs:<4} tg {r.tg_tps:9.1f} ± {r.tg_tps_std:.1f} t/s "
                    f"({r.step_ms:.1f} ms/step: capture {r.capture_ms:.2f}, score {r.score_ms:.2f}, cut "
                    f"{r.cut_ms:.2f}; prefill {r.prefill_s:.1f} s, {time.perf_counter() - t0:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
                print(
                    f"{'':>6} per step: engine {r.engine_ms:.2f} ms (decode {r.decode_ms:.2f}, logits "
                    f"{r.logits_ms:.2f}), python {r.python_ms:.2f}; score build {r.score_build_ms:.2f} "
                    f"({r.score_builds} builds), compute {r.score_compute_ms:.2f}, read {r.score_read_ms:.2f} "
                    f"({r.score_per_scored_ms:.2f} per scored step); cut choose {r.choose_ms:.2f}, move "
                    f"{r.move_ms:.2f}; one decode: {r.decode_unscored_ms:.2f} unscored, {r.decode_scored_ms:.2f} "
                    "scored",
                    file=sys.stderr,
                    flush=True,
                )
    except TovaError as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    base = next((r for r in results if r.policy == "full"), results[0] if results else None)
    for r in results:
        r.speedup = r.tg_tps / base.tg_tps
    rows = [asdict(r) for r in results]
    out = common.out_dir(args)
    common.write_csv(out / "batch.csv", rows, COLUMNS)
    common.write_json(
        out / "batch.json",
        common.meta(
            args,
            path,
            threads,
            chunk=args.chunk,
            kv_cells=kv_cells,
            full_seqs=args.full_seqs,
            kv_unified=bool(args.kv_unified),
            logits=bool(args.logits),
        ),
        rows,
    )
    print(table(results))
    if not args.no_plot:
        plot(results, out / "batch.png")
    print(f"\nwrote {out}/batch.csv, batch.json" + ("" if args.no_plot else ", batch.png"))
    return 0


def _label(r: BatchResult) -> str:
    return "full" if r.policy == "full" else f"{r.policy} B={r.budget}"


def table(results: list[BatchResult]) -> str:
    rows = [
        [
            r.model,
            r.backend,
            _label(r),
            str(r.n_seqs),
            str(r.cells_per_seq),
            str(r.kv_cells),
            f"{r.kv_bytes / 2**20:.0f}",
            str(int(r.flash_attn)),
            "unified" if r.kv_unified else "streams",
            str(r.evict_interval),
            "copied" if r.logits else "not read",
            f"{r.tg_tps:.1f} ± {r.tg_tps_std:.1f}",
            f"{r.step_ms:.1f}",
            f"{r.speedup:.2f}x",
        ]
        for r in results
    ]
    header = [
        "model",
        "backend",
        "cache",
        "seqs",
        "cells/seq",
        "KV cells",
        "KV MiB",
        "fa",
        "kv",
        "m",
        "logits",
        "t/s",
        "ms/step",
    ]
    return common.markdown_table(rows, [*header, "vs full"], right=set(range(3, 14)) - {8, 10})


def plot(results: list[BatchResult], path) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    labels = [f"{_label(r)}\n{r.n_seqs} seqs" for r in results]
    ax.bar(range(len(results)), [r.tg_tps for r in results], yerr=[r.tg_tps_std for r in results], color="C0")
    ax.set_xticks(range(len(results)), labels, fontsize=8)
    ax.set_ylabel("aggregate decode tokens/s")
    kv = results[0].kv_bytes / 2**30 if results else 0
    ax.set_title(f"{results[0].model}: sequences in {kv:.2f} GiB of KV, decoded together", fontsize=9)
    for i, r in enumerate(results):
        ax.annotate(f"{r.speedup:.2f}x", (i, r.tg_tps), ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, path)
    plt.close(fig)
