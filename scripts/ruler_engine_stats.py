"""Where a many-sequence RULER step spends its time: the first N prompts of a ruler-data.jsonl (from
`tova bench ruler --prepare`) answered through one BatchSession of N sequences (`ruler.answer_batch`, as
`tova bench ruler --batch N` does), then the engine's counters (BatchSession.engine_stats: cuts, move_s,
move_nodes, decode_s, ...) and the wall time. Used to measure the device mover before and after a change (run it
once per build). usage:
  python scripts/ruler_engine_stats.py --data ruler-data.jsonl [-m MODEL] [-n 8] [--policy tova]
      [--mode stream] [--compression 0.5] [-ngl 0] [-fa] [-t THREADS] [--chunk 256]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tova_cpp import batch, models
from tova_cpp.bench import ruler


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data", required=True, type=Path, help="ruler-data.jsonl from tova bench ruler --prepare"
    )
    p.add_argument("-m", "--model", default=None, help="GGUF path or model name (default: SmolLM2)")
    p.add_argument("-n", type=int, default=8, help="prompts, one sequence each (8)")
    p.add_argument("--policy", default="tova")
    p.add_argument("--mode", default="stream", choices=["fits", "stream"])
    p.add_argument("--compression", type=float, default=0.5)
    p.add_argument("-ngl", "--n-gpu-layers", type=int, default=0)
    p.add_argument("-fa", "--flash-attn", action="store_true")
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--chunk", type=int, default=256)
    a = p.parse_args()
    path = models.model_path(a.model)
    rows = [json.loads(line) for line in a.data.read_text().splitlines() if line.strip()][: a.n]
    items = [(r["tokens"], a.compression, int(r["tokens_to_generate"])) for r in rows]
    stats = {}
    close = batch.BatchSession.__exit__

    def keep_stats(self, *exc):  # the counters of the BatchSession answer_batch opens, read before it closes
        stats.update(self.engine_stats())
        return close(self, *exc)

    batch.BatchSession.__exit__ = keep_stats
    t0 = time.perf_counter()
    out = ruler.answer_batch(
        path, items, a.policy, a.mode, len(items), a.threads, a.chunk,
        n_gpu_layers=a.n_gpu_layers, flash_attn=a.flash_attn,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    print("prompts", [len(t) for t, _, _ in items])
    print("engine", json.dumps({k: round(float(v), 4) for k, v in stats.items()}))
    print(f"seconds {wall:.2f}")
    print("answers", [ans[:20] for ans, _ in out])


if __name__ == "__main__":
    main()
