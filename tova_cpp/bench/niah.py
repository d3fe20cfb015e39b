"""`tova bench niah`: needle in a haystack over the Paul Graham essays.

A sentence with a random 7-digit key ("The special magic number is 4821937.") is inserted at a sentence
boundary at each depth (0% = start of the haystack, 100% = end) of a haystack of essays, the question is asked
after it, the model's chat template is applied, the prompt is prefilled (for bounded policies in pieces of
`--chunk` tokens with a cut after each) and the answer is decoded greedily. A trial is correct when the key
appears in the answer. Every (policy, budget) sees the same prompts.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import TovaError
from ..session import Session
from . import common

COLUMNS = ["model", "policy", "budget", "context", "n_prompt", "depth", "trial", "key", "answer", "correct"]
QUESTION = (
    "What is the special magic number mentioned in the text above? Answer with the 7-digit number only."
)


@dataclass
class Prompt:
    context: int  # requested length in tokens
    depth: float  # 0..1
    trial: int
    key: str
    tokens: list[int]


@dataclass
class NiahResult:
    model: str
    policy: str
    budget: int
    context: int
    n_prompt: int
    depth: float
    trial: int
    key: str
    answer: str
    correct: int


def insert_needle(haystack: str, needle: str, depth: float) -> str:
    """Put `needle` at the first sentence boundary at or after `depth` of the haystack."""
    if depth <= 0:
        return f"{needle} {haystack}"
    at = int(depth * len(haystack))
    m = re.compile(r"[.!?](\s+|$)").search(haystack, at) if depth < 1 else None
    if m is None:
        return f"{haystack.rstrip()} {needle}"
    cut = m.end()
    return f"{haystack[:cut]}{needle} {haystack[cut:]}"


def make_prompts(
    s: Session, text: str, contexts: list[int], depths: list[float], n_trials: int, seed: int
) -> list[Prompt]:
    rng = np.random.default_rng(seed)

    def chat(body: str) -> list[int]:
        prompt = s.chat_prompt([{"role": "user", "content": f"{body}\n\n{QUESTION}"}])
        return s.tokenize(prompt, add_special=False, parse_special=True)

    prompts = []
    for trial in range(n_trials):
        for context in contexts:
            start = int(rng.integers(0, max(1, len(text) - context * 8)))
            start = text.find("\n", start) + 1  # begin on a line
            for depth in depths:
                key = str(int(rng.integers(1_000_000, 10_000_000)))
                needle = f"The special magic number is {key}."
                overhead = len(chat(needle))
                n_hay = context - overhead
                if n_hay < 16:
                    raise common.BenchError(
                        f"context {context} is too short for the question ({overhead} tokens)"
                    )
                hay_tokens = s.tokenize(text[start : start + context * 8], add_special=False)[:n_hay]
                if len(hay_tokens) < n_hay:
                    raise common.BenchError(f"the essays are too short for a context of {context} tokens")
                tokens = chat(insert_needle(s.detokenize(hay_tokens), needle, depth))
                prompts.append(Prompt(context, depth, trial, key, tokens))
    return prompts


def answer(s: Session, tokens: list[int], max_new: int) -> str:
    s.reset()
    s.eval(tokens)
    out = []
    for _ in range(max_new):
        tok = int(np.argmax(s.logits()))
        if s.is_eog(tok):
            break
        out.append(tok)
        s.eval([tok])
    return s.detokenize(out)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "niah",
        help="needle-in-a-haystack accuracy: depth x context length per policy/budget",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--contexts", type=common.int_list, default=[1024, 2048, 4096], help="prompt lengths, tokens"
    )
    p.add_argument(
        "--depths", type=common.float_list, default=[0, 25, 50, 75, 100], help="needle depths, percent"
    )
    p.add_argument("--budgets", type=common.int_list, default=[128, 512])
    p.add_argument("--n-trials", type=common._positive, default=1, help="prompts per (context, depth)")
    p.add_argument("--chunk", type=common._positive, default=256, help="prefill piece for bounded policies")
    p.add_argument("--max-new", type=common._positive, default=32, help="answer tokens at most")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--combine",
        nargs="+",
        metavar="CSV",
        help="run nothing: merge the niah.csv files of earlier runs into one table, CSV, JSON and heatmap",
    )
    common.add_common_args(p, out="bench_results/niah")
    p.set_defaults(func=run)


def read_csv(paths: list[str]) -> list[NiahResult]:
    import csv

    types = dict(NiahResult.__annotations__)
    out = []
    for path in paths:
        try:
            with open(path, newline="") as f:
                for row in csv.DictReader(f):
                    conv = {"int": int, "float": float, "str": str}
                    out.append(NiahResult(**{k: conv[types[k]](v) for k, v in row.items()}))
        except (OSError, KeyError, TypeError, ValueError) as e:
            raise common.BenchError(f"{path} is not a niah.csv from `tova bench niah`: {e}") from None
    return out


def combine(args: argparse.Namespace) -> int:
    results = common.read_combined(args, read_csv)
    if results is None:
        return 2
    contexts = sorted({r.context for r in results})
    depths = sorted({r.depth for r in results})
    out = common.out_dir(args)
    common.write_results(out, "niah", [asdict(r) for r in results], COLUMNS, common.combined_meta(args))
    print(table(results, contexts))
    if not args.no_plot:
        heatmap(results, contexts, depths, out / "niah.png")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.combine:
        return combine(args)
    try:
        if any(not 0 <= d <= 100 for d in args.depths):
            raise common.BenchError(f"--depths are percentages in 0..100, got {args.depths}")
        _, text = common.load_text("pg")
        path, threads, policies = common.resolve(args)
        depths = [d / 100 for d in args.depths]
        with Session(path, budget=1, policy="full", chunk=1, n_threads=threads, verbose=args.verbose) as s:
            prompts = make_prompts(s, text, args.contexts, depths, args.n_trials, args.seed)
        longest = max(len(p.tokens) for p in prompts) + args.max_new
        configs = [
            (p, longest if p == "full" else b)
            for p in policies
            for b in ([0] if p == "full" else args.budgets)
        ]
        results: list[NiahResult] = []
        for policy, budget in configs:
            chunk = min(args.chunk, longest) if policy == "full" else args.chunk
            with Session(
                path,
                budget=budget,
                policy=policy,
                chunk=chunk,
                n_threads=threads,
                verbose=args.verbose,
                **common.session_kwargs(policy),
            ) as s:
                from tqdm import tqdm

                t0 = time.perf_counter()
                label = policy if policy == "full" else f"{policy} B={budget}"
                for pr in tqdm(prompts, desc=label, unit="prompt", leave=False, file=sys.stderr):
                    text_out = answer(s, pr.tokens, args.max_new)
                    results.append(
                        NiahResult(
                            path.name,
                            policy,
                            budget,
                            pr.context,
                            len(pr.tokens),
                            pr.depth,
                            pr.trial,
                            pr.key,
                            text_out.strip(),
                            int(pr.key in text_out),
                        )
                    )
                acc = np.mean([r.correct for r in results[-len(prompts) :]])
                print(
                    f"{label}: accuracy {acc:.2f} over {len(prompts)} prompts "
                    f"({time.perf_counter() - t0:.0f} s)",
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
        "niah",
        [asdict(r) for r in results],
        COLUMNS,
        common.meta(
            args,
            path,
            threads,
            contexts=args.contexts,
            depths=args.depths,
            n_trials=args.n_trials,
            chunk=args.chunk,
            question=QUESTION,
        ),
    )
    print()
    print(table(results, args.contexts))
    if not args.no_plot:
        heatmap(results, args.contexts, depths, out / "niah.png")
    print(f"\nwrote {out}/niah.csv, niah.json" + ("" if args.no_plot else ", niah.png"))
    return 0


def _configs(results: list[NiahResult]) -> list[tuple[str, int]]:
    seen: dict[tuple[str, int], None] = {}
    for r in results:
        seen[(r.policy, r.budget)] = None
    return list(seen)


def table(results: list[NiahResult], contexts: list[int]) -> str:
    rows = []
    for policy, budget in _configs(results):
        mine = [r for r in results if (r.policy, r.budget) == (policy, budget)]
        cells = [f"{np.mean([r.correct for r in mine if r.context == c]):.2f}" for c in contexts]
        rows.append(
            [
                policy,
                "all" if policy == "full" else str(budget),
                *cells,
                f"{np.mean([r.correct for r in mine]):.2f}",
            ]
        )
    header = ["policy", "budget", *[f"ctx {c}" for c in contexts], "all"]
    return "accuracy (mean over depths and trials)\n" + common.markdown_table(
        rows, header, right=set(range(1, len(header)))
    )


def heatmap(results: list[NiahResult], contexts: list[int], depths: list[float], path: Path) -> None:
    plt = common.pyplot()
    configs = _configs(results)
    ncol = min(4, len(configs))
    nrow = -(-len(configs) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.8 * ncol + 1.2, 3.0 * nrow + 0.8), squeeze=False)
    for ax in axes.flat[len(configs) :]:
        ax.axis("off")
    im = None
    for ax, (policy, budget) in zip(axes.flat, configs, strict=False):
        grid = np.zeros((len(depths), len(contexts)))
        for i, d in enumerate(depths):
            for j, c in enumerate(contexts):
                hits = [
                    r.correct
                    for r in results
                    if (r.policy, r.budget, r.context, r.depth) == (policy, budget, c, d)
                ]
                grid[i, j] = np.mean(hits) if hits else np.nan
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i in range(len(depths)):
            for j in range(len(contexts)):
                ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(contexts)), [str(c) for c in contexts], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths], fontsize=7)
        ax.set_title(policy if policy == "full" else f"{policy} B={budget}", fontsize=9)
        ax.set_xlabel("context (tokens)", fontsize=7)
        if ax in axes[:, 0]:
            ax.set_ylabel("needle depth", fontsize=7)
    fig.suptitle(f"{results[0].model}: needle retrieval accuracy", fontsize=10)
    fig.subplots_adjust(hspace=0.6, wspace=0.35, right=0.85)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="accuracy")
    common.save_figure(fig, path, dpi=100)
    plt.close(fig)
