"""`tova bench ppl|ruler|niah|speed|retention|batch`: the evaluation suite (perplexity vs budget, RULER tasks vs
compression, needle retrieval vs depth, speed and memory vs depth, which tokens each layer keeps, sequences served
in a fixed memory). Each command
prints a table and writes CSV/JSON/PNG."""

from __future__ import annotations

import argparse
import functools
import importlib.util

from . import batch, niah, ppl, retention, ruler, speed

BENCH_EXTRA = ("matplotlib", "tqdm")


def _needs_bench_extra(run):
    """The benchmarks plot with matplotlib and report progress with tqdm: the [bench] extra."""

    @functools.wraps(run)
    def checked(args) -> int:
        missing = [m for m in BENCH_EXTRA if importlib.util.find_spec(m) is None]
        if missing:
            raise RuntimeError(
                f"tova bench needs the [bench] extra (missing: {', '.join(missing)}): pip install 'tova_cpp[bench]'"
            )
        return run(args)

    return checked


def add_commands(parser: argparse.ArgumentParser) -> None:
    """Adds the benchmark commands to `parser`; each sets `func=run(args) -> int`."""
    sub = parser.add_subparsers(
        dest="bench_command", metavar="{ppl,ruler,niah,speed,retention,batch}", required=True
    )
    for module in (ppl, ruler, niah, speed, retention, batch):
        module.add_parser(sub)
    for command in sub.choices.values():
        command.set_defaults(func=_needs_bench_extra(command.get_default("func")))


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Adds `bench` to a CLI's subparsers (from `ArgumentParser.add_subparsers()`)."""
    p = subparsers.add_parser(
        "bench", help="benchmarks: ppl, ruler, niah, speed, retention, batch", description=__doc__
    )
    add_commands(p)
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tova bench", description=__doc__)
    add_commands(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is not None:
        args.bench_argv = list(argv)
    return args.func(args)


__all__ = ["add_bench_parser", "build_parser", "main"]
