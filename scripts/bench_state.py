"""Save/load time and file size of a bounded conversation vs budget (docs/STATE.md).

For each budget: evaluate a prompt of budget + 64 tokens (so the cache is full and has been cut), then time
Session.save(path) and Session.load(path) into a second session (median of --repeat runs) and print a table.

    python scripts/bench_state.py --budgets 128 256 512 1024 2048
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from tova_cpp import Session, default_model_path
from tova_cpp.state import read_file

TEXT = (
    "The lighthouse keeper climbed the stairs every evening, counting the steps as he went. "
    "At the top he trimmed the wick, wound the clockwork and watched the ships pass in the dark. "
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default=None, help="GGUF (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--budgets", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    p.add_argument("--policy", default="tova")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("-t", "--threads", type=int, default=None)
    args = p.parse_args()
    model = args.model or default_model_path()
    print(f"model: {Path(model).name}, policy {args.policy}, f16 cache, median of {args.repeat}")
    print("| budget | cells held | KV MiB | file MiB | llama.cpp state MiB | save ms | load ms |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.tova"
        for budget in args.budgets:
            kw = {"budget": budget, "policy": args.policy, "n_threads": args.threads}
            with Session(model, **kw) as a, Session(model, **kw) as b:
                tokens = a.tokenize(TEXT * (budget // 30 + 4))[: budget + 64]
                a.eval(tokens)
                saves, loads = [], []
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    size = a.save(path)
                    t1 = time.perf_counter()
                    b.load(path)
                    t2 = time.perf_counter()
                    saves.append(t1 - t0)
                    loads.append(t2 - t1)
                assert b.n_past == a.n_past
                llama_mib = len(read_file(path).llama_state) / 2**20
                kv_mib = a.n_occupied * a.kv_row_bytes() / 2**20
                print(
                    f"| {budget} | {a.n_occupied} | {kv_mib:.2f} | {size / 2**20:.2f} | {llama_mib:.2f} "
                    f"| {statistics.median(saves) * 1e3:.1f} | {statistics.median(loads) * 1e3:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
