"""Several `tova bench ppl` settings side by side on one window, one position at a time for all of them, with
per-token losses checkpointed: a run stopped at any time leaves every setting with the same positions, which
scripts/compare_nll.py then compares pairwise. For a CPU shared with other jobs, where a sequential sweep would
leave the last settings unrun. Same protocol as `tova bench ppl` (first `budget` tokens batched, then one
token per call).

usage: python scripts/ppl_lockstep.py -m MODEL --ctx 4096 --budget 512 --policies tova,h2o -o DIR [-t 1]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from tova_cpp.bench import common, ppl
from tova_cpp.models import model_path
from tova_cpp.session import Session


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default=None)
    p.add_argument("--texts", default="pg")
    p.add_argument("--ctx", type=int, default=4096)
    p.add_argument("--first-window", type=int, default=0)
    p.add_argument("--budget", type=int, default=512)
    p.add_argument("--policies", type=common.policy_list, default=["tova", "h2o"])
    p.add_argument("-t", "--threads", type=int, default=1)
    p.add_argument("--every", type=int, default=64, help="positions between checkpoints")
    p.add_argument("-o", "--out", required=True)
    args = p.parse_args(argv)
    path = model_path(args.model)
    name, text = common.load_text(args.texts)
    if args.first_window:
        name += f"@{args.first_window}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with Session(path, budget=1, policy="full", chunk=1, n_threads=args.threads) as tok:
        (win,) = ppl.text_windows(tok, text, args.ctx, 1, args.first_window)
    sessions, nlls, files = [], [], []
    for policy in args.policies:
        s = Session(
            path,
            budget=args.budget,
            policy=policy,
            chunk=1,
            n_ubatch=ppl.PREFIX_BLOCK,
            n_threads=args.threads,
        )
        sessions.append(s)
        nlls.append(np.full(win.size - 1, np.nan))
        files.append(out / f"nll-{name}-{policy}-{args.budget}-f16-f16.partial.npy")
    prefix = min(args.budget, win.size - 1)
    t0 = time.perf_counter()
    for s, nll in zip(sessions, nlls, strict=True):
        s.reset()
        for a in range(0, prefix, ppl.PREFIX_BLOCK):
            b = min(prefix, a + ppl.PREFIX_BLOCK)
            nll[a:b] = ppl._nll(s.eval(win[a:b], logits_all=True), win[a + 1 : b + 1])
    for i in range(prefix, win.size - 1):
        for s, nll in zip(sessions, nlls, strict=True):
            s.eval(win[i : i + 1])
            nll[i] = ppl._nll(s.logits(), win[i + 1 : i + 2])[0]
        if (i + 1) % args.every == 0 or i == win.size - 2:
            for nll, f in zip(nlls, files, strict=True):
                with common.replacing(f) as tmp, tmp.open("wb") as fh:
                    np.save(fh, nll[: i + 1].astype(np.float32))
            print(f"{i + 1} positions, {time.perf_counter() - t0:.0f} s", flush=True)
    for nll, f, policy in zip(nlls, files, args.policies, strict=True):
        f.rename(f.with_name(f.name.replace(".partial", "")))
        print(policy, ppl.final_estimate(*ppl.perplexity(nll)))
    for s in sessions:
        s.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
