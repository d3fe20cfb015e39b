"""How far apart (by the float64 oracle's scores) are two keys whose order F16 arithmetic flips?

Runs tests/reference.py's oracle twice on random tova sequences of the tiny test model (budget 2..24, keep
0..6, one token at a time): in float64, and with the roundings flash attention and an F16 cache apply (K, V and
the query rounded to F16). At the first cut where their kept sets differ it records, per differing layer, how
far apart the swapped keys are by the float64 scores. The largest gap bounds the near-tie rule of
tests/test_fuzz.py (TIE_RTOL); docs/RELIABILITY.md records a run.

    python scripts/tie_flips.py --seconds 240
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from reference import Reference
from tiny_gguf import write_tiny_llama


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=240.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        m = write_tiny_llama(Path(d) / "tiny.gguf")
    rng = np.random.default_rng(args.seed)
    gaps, cuts, t0 = [], 0, time.time()
    while time.time() - t0 < args.seconds:
        budget = int(rng.integers(2, 25))
        keep = int(rng.integers(0, min(budget - 1, 6) + 1))
        exact = Reference(m, budget, 1, "tova", keep=keep)
        f16 = Reference(m, budget, 1, "tova", keep=keep, type_k="f16", type_v="f16")
        for t in rng.integers(0, m.n_vocab, int(rng.integers(budget + 2, 70))).tolist():
            exact.eval([t])
            f16.eval([t])
            if exact.before_cut is None:
                continue
            cuts += 1
            ka, kb = exact.kept_positions(), f16.kept_positions()
            if np.array_equal(ka, kb):
                continue
            rows, pos = exact.before_cut[4], exact.before_cut[2]
            for il in range(m.n_layer):
                if np.array_equal(ka[il], kb[il]):
                    continue
                score = dict(zip(pos[il].tolist(), rows[il].tolist(), strict=True))
                only_exact = set(ka[il].tolist()) - set(kb[il].tolist())
                only_f16 = set(kb[il].tolist()) - set(ka[il].tolist())
                gaps.append(max(score[q] for q in only_exact) / min(score[q] for q in only_f16) - 1)
            break  # the two now hold different caches: start a new sequence
    g = np.array(sorted(gaps))
    print(f"{cuts} cuts, {len(g)} flipped layer-cuts")
    if len(g):
        q95 = np.quantile(g, 0.95)
        print(
            f"gap of the swapped keys: median {np.median(g):.2%}, 95th percentile {q95:.2%}, max {g.max():.2%}"
        )


if __name__ == "__main__":
    main()
