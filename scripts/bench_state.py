"""Save/load time and file size of a bounded conversation vs budget (docs/STATE.md).

For each budget: evaluate a prompt of budget + 64 tokens (so the cache is full and has been cut), then time
Session.save(path) and Session.load(path) into a second session (median of --repeat runs) and print a table.
With --batch N: one sequence of a BatchSession of N sequences, each holding such a prompt; times
BatchSession.save(seq, path) (park), remove(seq), and load(None, path) (resume into its own cells).

    python scripts/bench_state.py --budgets 128 256 512 1024 2048
    python scripts/bench_state.py --batch 4 --budgets 128 256 512 1024 2048
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
    p.add_argument("--batch", type=int, default=0, help="a BatchSession of this many sequences")
    args = p.parse_args()
    model = args.model or default_model_path()
    if args.batch:
        return bench_batch(model, args)
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


def bench_batch(model, args) -> None:
    from tova_cpp.batch import BatchSession

    print(
        f"model: {Path(model).name}, policy {args.policy}, f16 cache, one sequence of {args.batch}, "
        f"median of {args.repeat}"
    )
    print("| budget | cells held | KV MiB | file MiB | llama.cpp state MiB | save ms | load ms |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.tova"
        for budget in args.budgets:
            kw = {"budget": budget, "policy": args.policy, "n_threads": args.threads}
            with BatchSession(model, n_seq_max=args.batch, **kw) as bs:
                seqs = [bs.add() for _ in range(args.batch)]
                text = bs.tokenize(TEXT * (budget // 30 + 4))
                bs.step({s: text[i : i + budget + 64] for i, s in enumerate(seqs)})
                seq, n_past, n_occ = seqs[-1], bs.n_past(seqs[-1]), bs.n_occupied(seqs[-1])
                saves, loads = [], []
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    size = bs.save(seq, path)
                    t1 = time.perf_counter()
                    bs.remove(seq)
                    t2 = time.perf_counter()
                    seq = bs.load(None, path)
                    t3 = time.perf_counter()
                    saves.append(t1 - t0)
                    loads.append(t3 - t2)
                assert (bs.n_past(seq), bs.n_occupied(seq)) == (n_past, n_occ)
                llama_mib = len(read_file(path).llama_state) / 2**20
                kv_mib = n_occ * bs.kv_row_bytes() / 2**20
                print(
                    f"| {budget} | {n_occ} | {kv_mib:.2f} | {size / 2**20:.2f} | {llama_mib:.2f} "
                    f"| {statistics.median(saves) * 1e3:.1f} | {statistics.median(loads) * 1e3:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
