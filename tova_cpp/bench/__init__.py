"""`tova bench ppl|niah|speed|retention`: the evaluation suite (perplexity vs budget, needle retrieval, speed
and memory vs depth, which tokens each layer keeps). Each command prints a table and writes CSV/JSON/PNG."""

from __future__ import annotations

import argparse

from . import niah, ppl, retention, speed


def add_commands(parser: argparse.ArgumentParser) -> None:
    """Adds the four benchmark commands to `parser`; each sets `func=run(args) -> int`."""
    sub = parser.add_subparsers(dest="bench_command", metavar="{ppl,niah,speed,retention}", required=True)
    for module in (ppl, niah, speed, retention):
        module.add_parser(sub)


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Adds `bench` to a CLI's subparsers (from `ArgumentParser.add_subparsers()`)."""
    p = subparsers.add_parser("bench", help="benchmarks: ppl, niah, speed, retention", description=__doc__)
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
