"""Load test of `tova serve`: aggregate tokens/s and latency against the number of concurrent clients.

For each concurrency level C it starts a fresh server with C slots (or uses --url), runs C clients at once
and reports, llama-bench style: requests, prompt and generated tokens, wall time, aggregate generated
tokens/s, time to first token (p50 / p95), inter-token latency (p50), requests that failed, and the
server's resident memory before and after. With a chat model every client holds a multi-turn
conversation (each turn --words random words, a follow-up that reuses its slot); with --synthetic (a
random-weight model without a tokenizer) every client streams one completion of --prompt-tokens random
token ids.

    python scripts/load_server.py --clients 1,4,16,32 --turns 4 --words 500 --max-tokens 32 -t 2
    python scripts/load_server.py --synthetic 8b --clients 64 --prompt-tokens 512 --max-tokens 128 \\
        --server-args "-ngl 99 -fa on --budget 1024"
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

WORDS = (
    "river mountain city engine garden history music science ocean forest market letter window station "
    "harbor bridge winter summer lantern pocket silver copper meadow valley thunder whisper candle"
).split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return float("nan")


@contextlib.contextmanager
def server(model: str, slots: int, extra: list[str], log):
    port = free_port()
    cmd = [sys.executable, "-m", "tova_cpp", "serve", "-m", model, "--port", str(port), "--slots", str(slots)]
    proc = subprocess.Popen(cmd + extra, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"tova serve exited with {proc.returncode}; see its log")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(url + "/health", timeout=5).read()
                break
            if time.monotonic() > deadline:
                raise SystemExit("tova serve did not start within 600 s")
            time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


class Client:
    """One client's requests; records per request the time to first token, the token times and usage."""

    def __init__(self, url: str, args, seed: int) -> None:
        import openai

        self.c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600)
        self.args, self.rng = args, random.Random(seed)
        self.records: list[dict] = []
        self.failed = 0

    def _consume(self, stream, t0: float) -> tuple[str, dict]:
        first, times, text, usage, reason = None, [], "", None, None
        for ch in stream:
            if ch.usage is not None:
                usage = ch.usage
            if not ch.choices:
                continue
            c0 = ch.choices[0]
            piece = c0.delta.content if hasattr(c0, "delta") else c0.text
            if c0.finish_reason:
                reason = c0.finish_reason
            elif piece is not None:
                now = time.perf_counter()
                first = first or now
                times.append(now)
                text += piece
        itl = [b - a for a, b in zip(times, times[1:], strict=False)]
        rec = {
            "ttft": (first or time.perf_counter()) - t0,
            "itl": itl,
            "prompt_tokens": usage.prompt_tokens if usage else 0,
            "reused": getattr(usage, "reused_prompt_tokens", 0) if usage else 0,
            "completion_tokens": usage.completion_tokens if usage else 0,
            "complete": reason is not None and usage is not None,
        }
        return text, rec

    def run(self) -> None:
        a = self.args
        try:
            if a.synthetic:
                prompt = [self.rng.randrange(1, 1000) for _ in range(a.prompt_tokens)]
                t0 = time.perf_counter()
                s = self.c.completions.create(
                    model="x",
                    prompt=prompt,
                    max_tokens=a.max_tokens,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                self.records.append(self._consume(s, t0)[1])
                return
            messages = [{"role": "system", "content": "You are a terse assistant."}]
            for turn in range(a.turns):
                words = " ".join(self.rng.choice(WORDS) for _ in range(a.words))
                messages.append({"role": "user", "content": f"{words}. Summarize part {turn + 1}."})
                t0 = time.perf_counter()
                s = self.c.chat.completions.create(
                    model="x",
                    messages=messages,
                    max_tokens=a.max_tokens,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                text, rec = self._consume(s, t0)
                self.records.append(rec)
                messages.append({"role": "assistant", "content": text})
        except Exception as e:  # counted: the table reports failed requests
            print(f"client error: {e!r}", file=sys.stderr)
            self.failed += 1
        finally:
            self.c.close()


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def level(url: str, args, n: int) -> dict:
    rss0 = metric(url, "process_resident_memory_bytes")
    clients = [Client(url, args, seed=1000 * n + i) for i in range(n)]
    threads = [threading.Thread(target=c.run) for c in clients]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    recs = [r for c in clients for r in c.records]
    gen = sum(r["completion_tokens"] for r in recs)
    prompt = sum(r["prompt_tokens"] for r in recs)
    return {
        "clients": n,
        "requests": len(recs),
        "failed": sum(c.failed for c in clients) + sum(not r["complete"] for r in recs),
        "prompt_tokens": prompt,
        "reused_prompt_tokens": sum(r["reused"] for r in recs),
        "generated_tokens": gen,
        "wall_s": wall,
        "gen_tps": gen / wall,
        "total_tps": (prompt - sum(r["reused"] for r in recs) + gen) / wall,
        "ttft_p50": pct([r["ttft"] for r in recs], 0.5),
        "ttft_p95": pct([r["ttft"] for r in recs], 0.95),
        "itl_p50_ms": 1e3
        * (statistics.median([x for r in recs for x in r["itl"]]) if recs else float("nan")),
        "rss_before_mib": rss0 / 2**20,
        "rss_after_mib": metric(url, "process_resident_memory_bytes") / 2**20,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default=None, help="GGUF (default: SmolLM2-135M-Instruct)")
    p.add_argument("--synthetic", choices=["1b", "8b", "tiny"], default=None, help="random-weight model")
    p.add_argument("--out", default="load-server", help="folder for the synthetic model, log and JSON")
    p.add_argument("--clients", default="1,4,16,32", help="concurrency levels (comma-separated)")
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--words", type=int, default=400, help="random words per user turn")
    p.add_argument("--prompt-tokens", type=int, default=512, help="--synthetic: prompt length")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("-t", "--threads", type=int, default=None, help="server threads")
    p.add_argument("--server-args", default="--budget 256", help="more `tova serve` flags (quoted)")
    p.add_argument("--url", default=None, help="an already running server (its slots are its own)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.synthetic:
        from tova_cpp.bench.synthetic import write_model

        model = out / f"synthetic-{args.synthetic}.gguf"
        if not model.exists():
            write_model(model, args.synthetic)
        args.model = str(model)
    elif args.model is None:
        from tova_cpp.models import default_model_path

        args.model = str(default_model_path())
    extra = shlex.split(args.server_args) + (["-t", str(args.threads)] if args.threads else [])
    rows = []
    with open(out / "server.log", "w") as log:
        for n in [int(x) for x in args.clients.split(",")]:
            if args.url:
                rows.append(level(args.url, args, n))
            else:
                with server(args.model, n, extra, log) as url:
                    rows.append(level(url, args, n))
            r = rows[-1]
            print(json.dumps(r), file=sys.stderr)
    print(f"model {Path(args.model).name}; server flags: {' '.join(extra)}")
    print(
        "| clients | requests | failed | prompt tok (reused) | gen tok | wall s | gen t/s | prompt+gen t/s "
        "| TTFT p50 / p95 s | ITL p50 ms | RSS MiB before -> after |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['clients']} | {r['requests']} | {r['failed']} | {r['prompt_tokens']} ({r['reused_prompt_tokens']}) "
            f"| {r['generated_tokens']} | {r['wall_s']:.1f} | {r['gen_tps']:.1f} | {r['total_tps']:.1f} "
            f"| {r['ttft_p50']:.2f} / {r['ttft_p95']:.2f} | {r['itl_p50_ms']:.1f} "
            f"| {r['rss_before_mib']:.0f} -> {r['rss_after_mib']:.0f} |"
        )
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    return 1 if any(r["failed"] for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
