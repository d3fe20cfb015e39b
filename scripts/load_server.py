"""Load test of `tova serve`: aggregate tokens/s and latency against the number of concurrent clients.

For each concurrency level C it starts a fresh server with C slots (or uses --url, or one server of --slots
slots for every level), runs C clients at once and reports, llama-bench style: requests, prompt and generated
tokens, the shortest conversation's length at its last turn, wall time, aggregate generated tokens/s, the
server's CPU time (and tokens evaluated per CPU-second: what a shared machine's wall time hides), time to
first token (p50 / p95), inter-token latency (p50), requests that failed, and the server's resident memory
before and after. With a chat model every client holds a multi-turn conversation (each turn --words random
words, a follow-up that reuses its slot); with --synthetic (a random-weight model without a tokenizer) every
client streams one completion of --prompt-tokens random token ids.

    # the load test's long conversations (tests/test_server_load.py): 12 turns, about 3,100 tokens each
    python scripts/load_server.py --clients 1,8,32 --turns 12 --words 240 --max-tokens 16 \\
        --server-args "--budget 32 --chunk 64 -b 512"
    python scripts/load_server.py --synthetic 8b --slots 64 --clients 1,8,64 --prompt-tokens 512 \\
        --max-tokens 128 --server-args "-ngl 99 -fa on --budget 256"
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
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
    Path(log.name).with_name("server.pid").write_text(str(proc.pid))  # for a caller that must clean up
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


def sse(url: str, path: str, body: dict):
    """POST `body` and yield the decoded JSON of each server-sent event until [DONE] (standard library only:
    the GPU machine has no openai client)."""
    host = url.removeprefix("http://")
    conn = http.client.HTTPConnection(host, timeout=3600)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            yield event
        raise RuntimeError("the stream ended without [DONE]")
    finally:
        conn.close()


class Client:
    """One client's requests; records per request the time to first token, the token times and usage."""

    def __init__(self, url: str, args, seed: int) -> None:
        self.url, self.args, self.rng = url, args, random.Random(seed)
        self.records: list[dict] = []
        self.failed = 0

    def _request(self, path: str, body: dict) -> str:
        body.update(temperature=0, stream=True, stream_options={"include_usage": True})
        t0 = time.perf_counter()
        times, text, usage, reason = [], "", None, None
        for ev in sse(self.url, path, body):
            if ev.get("usage"):
                usage = ev["usage"]
            if not ev.get("choices"):
                continue
            c0 = ev["choices"][0]
            if c0.get("finish_reason"):
                reason = c0["finish_reason"]
                continue
            piece = c0["delta"].get("content") if "delta" in c0 else c0.get("text")
            if piece is not None and not ("delta" in c0 and "role" in c0["delta"]):
                times.append(time.perf_counter())
                text += piece
        self.records.append(
            {
                "ttft": (times[0] if times else time.perf_counter()) - t0,
                "itl": [b - a for a, b in zip(times, times[1:], strict=False)],
                "prompt_tokens": usage["prompt_tokens"] if usage else 0,
                "reused": usage.get("reused_prompt_tokens", 0) if usage else 0,
                "completion_tokens": usage["completion_tokens"] if usage else 0,
                "complete": reason is not None and usage is not None,
            }
        )
        return text

    def run(self) -> None:
        a = self.args
        try:
            if a.synthetic:
                prompt = [self.rng.randrange(1, 1000) for _ in range(a.prompt_tokens)]
                self._request("/v1/completions", {"prompt": prompt, "max_tokens": a.max_tokens})
                return
            messages = [{"role": "system", "content": "You are a terse assistant."}]
            for turn in range(a.turns):
                words = " ".join(self.rng.choice(WORDS) for _ in range(a.words))
                messages.append({"role": "user", "content": f"{words}. Summarize part {turn + 1}."})
                text = self._request(
                    "/v1/chat/completions", {"messages": list(messages), "max_tokens": a.max_tokens}
                )
                messages.append({"role": "assistant", "content": text})
        except Exception as e:  # counted: the table reports failed requests
            print(f"client error: {e!r}", file=sys.stderr)
            self.failed += 1


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def level(url: str, args, n: int) -> dict:
    rss0 = metric(url, "process_resident_memory_bytes")
    cpu0 = metric(url, "process_cpu_seconds_total")
    clients = [Client(url, args, seed=1000 * n + i) for i in range(n)]
    threads = [threading.Thread(target=c.run) for c in clients]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu = metric(url, "process_cpu_seconds_total") - cpu0
    recs = [r for c in clients for r in c.records]
    # each conversation's length at its last turn: its whole prompt plus the reply
    conv = [c.records[-1]["prompt_tokens"] + c.records[-1]["completion_tokens"] for c in clients if c.records]
    gen = sum(r["completion_tokens"] for r in recs)
    prompt = sum(r["prompt_tokens"] for r in recs)
    return {
        "clients": n,
        "requests": len(recs),
        "failed": sum(c.failed for c in clients) + sum(not r["complete"] for r in recs),
        "prompt_tokens": prompt,
        "reused_prompt_tokens": sum(r["reused"] for r in recs),
        "conversation_tokens_min": min(conv, default=0),
        "generated_tokens": gen,
        "wall_s": wall,
        "gen_tps": gen / wall,
        "total_tps": (prompt - sum(r["reused"] for r in recs) + gen) / wall,
        "server_cpu_s": cpu,
        "total_per_cpu_s": (prompt - sum(r["reused"] for r in recs) + gen) / cpu if cpu > 0 else float("nan"),
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
    p.add_argument("--slots", type=int, default=None, help="one server with this many slots for every level")
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
    levels = [int(x) for x in args.clients.split(",")]
    with open(out / "server.log", "w") as log, contextlib.ExitStack() as stack:
        url = args.url
        if url is None and args.slots:
            url = stack.enter_context(server(args.model, args.slots, extra, log))
        for n in levels:
            if url is not None:
                rows.append(level(url, args, n))
            else:
                with server(args.model, n, extra, log) as one:
                    rows.append(level(one, args, n))
            print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"model {Path(args.model).name}; server flags: {' '.join(extra)}")
    print(
        "| clients | requests | failed | conv tok (min) | prompt tok (reused) | gen tok | wall s | gen t/s "
        "| prompt+gen t/s | server CPU s (t per CPU s) | TTFT p50 / p95 s | ITL p50 ms | RSS MiB before -> after |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['clients']} | {r['requests']} | {r['failed']} | {r['conversation_tokens_min']} "
            f"| {r['prompt_tokens']} ({r['reused_prompt_tokens']}) "
            f"| {r['generated_tokens']} | {r['wall_s']:.1f} | {r['gen_tps']:.1f} | {r['total_tps']:.1f} "
            f"| {r['server_cpu_s']:.0f} ({r['total_per_cpu_s']:.0f}) "
            f"| {r['ttft_p50']:.2f} / {r['ttft_p95']:.2f} | {r['itl_p50_ms']:.1f} "
            f"| {r['rss_before_mib']:.0f} -> {r['rss_after_mib']:.0f} |"
        )
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    return 1 if any(r["failed"] for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
