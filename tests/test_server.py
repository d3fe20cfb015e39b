"""`tova serve` as a real process on a free port, driven by the official `openai` client: completions, chat,
streaming, errors, the API key, the limits, cancellation and prefix reuse. The load test (32 concurrent
conversations of several thousand tokens) is tests/test_server_load.py."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai", reason="the [test] extra installs openai")
pytest.importorskip(
    "fastapi", reason="tova serve needs the [server] extra (scripts/setup.sh --test installs it)"
)

KEY = "test-key-123"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, key: str | None = KEY) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@contextlib.contextmanager
def run_server(model, *args: str, threads: int | None = 1):
    """A `tova serve` process on a free port; yields (base url, process). Stopped with SIGINT. threads=None
    leaves -t to the server (the cores other processes leave free)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "tova_cpp", "serve", "-m", str(model), "--port", str(port), *args]
    cmd += [] if threads is None else ["-t", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"tova serve exited with {proc.returncode}:\n{proc.stdout.read()}")
            with contextlib.suppress(OSError):
                if _get(url + "/health", None)[0] == 200:
                    break
            if time.monotonic() > deadline:
                raise AssertionError("tova serve did not answer /health within 180 s")
            time.sleep(0.2)
        yield url, proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        assert "Traceback" not in out, out


_clients: list = []


def _client(url: str, key: str = KEY):
    c = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=600)
    _clients.append(c)
    return c


@pytest.fixture(autouse=True)
def _close_clients():
    yield
    while _clients:
        _clients.pop().close()


@pytest.fixture(scope="module")
def server(smollm2_path):
    args = ["--slots", "3", "--budget", "64", "--chunk", "64", "--api-key", KEY, "--temp", "0"]
    args += ["--max-tokens-limit", "48", "--max-body-bytes", "200000"]
    with run_server(smollm2_path, *args) as (url, proc):
        yield url


def _metric(url: str, name: str, labels: str = "") -> float:
    status, text = _get(url + "/metrics")
    assert status == 200
    total = 0.0
    for line in text.splitlines():
        metric, _, value = line.rpartition(" ")
        if metric.split("{")[0] == name and labels in metric:
            total += float(value)
    return total


def test_models_and_health(server):
    models = _client(server).models.list()
    assert [m.id for m in models.data] == ["SmolLM2-135M-Instruct.Q4_1.gguf"]
    status, body = _get(server + "/health", None)  # no key needed
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_completion_matches_tova_llama(server, smollm2_path):
    """Greedy completion through the server = tova_cpp.Llama's, same budget and chunk."""
    from tova_cpp import Llama

    prompt = "The three primary colors are"
    r = _client(server).completions.create(model="x", prompt=prompt, max_tokens=12, temperature=0)
    with Llama(str(smollm2_path), n_ctx=64, chunk=64, n_threads=1) as llm:
        want = llm.create_completion(prompt, max_tokens=12, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].text == want["choices"][0]["text"]
    assert r.choices[0].finish_reason == want["choices"][0]["finish_reason"] == "length"
    assert r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens == want["usage"]["prompt_tokens"]


def test_chat_stream_equals_non_stream(server):
    c = _client(server)
    messages = [{"role": "user", "content": "Name a fruit."}]
    full = c.chat.completions.create(model="x", messages=messages, max_tokens=10, temperature=0)
    chunks = list(
        c.chat.completions.create(
            model="x",
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert full.choices[0].message.content == text and text
    reasons = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert reasons == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completion_stream_and_logprobs(server):
    c = _client(server)
    stream = c.completions.create(
        model="x", prompt="One, two, three,", max_tokens=6, temperature=0, stream=True
    )
    parts = list(stream)
    whole = c.completions.create(
        model="x", prompt="One, two, three,", max_tokens=6, temperature=0, logprobs=3
    )
    assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text
    lp = whole.choices[0].logprobs
    assert len(lp.tokens) == 6 and "".join(lp.tokens) == whole.choices[0].text
    # greedy: the sampled token is the most likely one
    for tok, top, value in zip(lp.tokens, lp.top_logprobs, lp.token_logprobs, strict=True):
        assert value <= 0 and max(top.values()) == pytest.approx(value) and top[tok] == value


def test_follow_up_reuses_the_slot(server):
    """A second turn that extends the first evaluates only the new tokens; a conversation far longer than
    the budget (64 cells) runs without a context error, evicting."""
    c = _client(server)
    long_text = " ".join(f"Item {i} is a small stone." for i in range(60))
    messages = [{"role": "user", "content": long_text + " Which item is last?"}]
    first = c.chat.completions.create(model="x", messages=messages, max_tokens=8, temperature=0)
    assert first.usage.prompt_tokens > 400 and first.usage.evicted_tokens > 300
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And the first?"},
    ]
    second = c.chat.completions.create(model="x", messages=messages, max_tokens=8, temperature=0)
    reused = second.usage.prompt_tokens_details.cached_tokens
    assert reused == second.usage.reused_prompt_tokens
    assert reused >= first.usage.prompt_tokens + first.usage.completion_tokens - 1
    assert second.usage.prompt_tokens - reused < 20  # only the new turn was evaluated


def test_concurrent_requests_share_decodes(server):
    """6 requests on 3 slots at once: 3 wait in the queue, all finish, and the decode steps are far fewer
    than the tokens generated (the slots decode together, one batched step for all)."""
    steps0 = _metric(server, "tova_decode_steps_total")
    gen0 = _metric(server, "tova_generated_tokens_total")
    out: list = []

    def one(i: int) -> None:
        c = _client(server)
        out.append(
            c.completions.create(
                model="x",
                prompt=f"List {i}: apples,",
                max_tokens=12,
                temperature=0,
                extra_body={"min_tokens": 12},
            )
        )

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 6 and all(r.usage.completion_tokens == 12 for r in out)
    generated = _metric(server, "tova_generated_tokens_total") - gen0
    steps = _metric(server, "tova_decode_steps_total") - steps0
    assert generated == 72 and steps < 0.75 * generated, (steps, generated)


def test_errors_have_openai_shape(server):
    c = _client(server)
    msg = [{"role": "user", "content": "hi"}]
    cases = [
        (dict(max_tokens=49), "max_tokens"),  # over --max-tokens-limit
        (dict(budget=65), "budget"),
        (dict(policy="window"), "policy"),
        (dict(keep=64), "keep"),
        (dict(n=2), "n"),
        (dict(temperature="hot"), "temperature"),
        (dict(grammar="root ::= ("), "grammar"),
    ]
    for extra, param in cases:
        body = {k: v for k, v in extra.items() if k in ("max_tokens", "n", "temperature")}
        rest = {k: v for k, v in extra.items() if k not in body}
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="x", messages=msg, extra_body=rest, **body)
        err = e.value.body
        assert e.value.status_code == 400 and err["type"] == "invalid_request_error", err
        assert err["param"] == param and "Traceback" not in err["message"], err
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="x", messages=[{"role": "robot", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="x", prompt="")
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="x", prompt=[10**9])
    status, body = _get(server + "/v1/nothing")
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"


def test_api_key_and_limits(server):
    msg = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.AuthenticationError) as e:
        _client(server, key="wrong").chat.completions.create(model="x", messages=msg, max_tokens=2)
    assert e.value.body["code"] == "invalid_api_key"
    for path in ("/v1/models", "/metrics"):
        assert _get(server + path, None)[0] == 401
        assert _get(server + path, "wrong")[0] == 401
    assert _get(server + "/docs")[0] == 404 and _get(server + "/openapi.json")[0] == 404
    with pytest.raises(openai.APIStatusError) as e:
        _client(server).chat.completions.create(
            model="x", messages=[{"role": "user", "content": "x" * 300_000}]
        )
    assert e.value.status_code == 413 and e.value.body["code"] == "body_too_large"
    # a chunked body (no Content-Length) over the limit is cut off too
    conn = __import__("http.client").client.HTTPConnection(server.removeprefix("http://"), timeout=30)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Authorization", f"Bearer {KEY}")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    data = json.dumps({"prompt": "y" * 300_000}).encode()
    for i in range(0, len(data), 50_000):
        piece = data[i : i + 50_000]
        conn.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
    conn.send(b"0\r\n\r\n")
    resp = conn.getresponse()
    status, body = resp.status, resp.read()
    conn.close()
    assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"


def test_disconnect_cancels_and_frees_the_slot(smollm2_path):
    with run_server(smollm2_path, "--slots", "1", "--budget", "64", "--api-key", KEY) as (url, _):
        c = _client(url)
        stream = c.completions.create(model="x", prompt="Count: 1, 2, 3,", max_tokens=4000, stream=True)
        next(iter(stream))
        stream.close()  # the client leaves after one chunk
        deadline = time.monotonic() + 60
        while _metric(url, "tova_generations_total", 'finish_reason="cancelled"') < 1:
            assert time.monotonic() < deadline, "the generation was not cancelled"
            time.sleep(0.2)
        assert _metric(url, "tova_slots_busy") == 0
        # the one slot serves the next request
        r = c.completions.create(model="x", prompt="Hello", max_tokens=3)
        assert r.usage.completion_tokens == 3
        assert _metric(url, "tova_generated_tokens_total") < 1000


def test_cli_flags():
    """`tova serve` takes llama.cpp server's -np / --parallel / -cb; `tova generate` still refuses them."""
    from tova_cpp.cli import _unsupported, build_parser, main

    assert _unsupported(["serve", "-np", "2", "-cb"]) is None
    assert "not supported" in _unsupported(["generate", "-np", "2"])
    args = build_parser().parse_args(["serve", "-np", "6", "--port", "0", "-c", "512"])
    assert (args.slots, args.port, args.budget, args.host, args.api_key) == (6, 0, 512, "127.0.0.1", None)
    assert main(["serve", "--grammar", "root ::= x"]) == 1  # per request only


def test_serve_and_generate_share_their_flags():
    """`tova serve` and `tova generate` read the model, cache and sampling flags through one translation each
    (cli._cache_kwargs, cli._sampling_defaults): every keyword it makes is one the engines and the request
    model accept, and the flags arrive as given."""
    import inspect

    from tova_cpp import Llama
    from tova_cpp.batch import BatchSession
    from tova_cpp.cli import _cache_kwargs, _sampling, _sampling_defaults, build_parser
    from tova_cpp.server import build
    from tova_cpp.server.protocol import _Common

    flags = [
        "--policy",
        "sink",
        "--n-sink",
        "2",
        "-fa",
        "on",
        "-ctk",
        "q8_0",
        "--chunk",
        "32",
        "--temp",
        "0.3",
    ]
    for command in ("serve", "generate"):
        args = build_parser().parse_args([command, *flags, "--top-k", "7", "-s", "5"])
        kw = _cache_kwargs(args)
        assert (kw["policy"], kw["n_sink"], kw["flash_attn"], kw["type_k"], kw["chunk"]) == (
            "sink",
            2,
            True,
            "q8_0",
            32,
        )
        assert set(kw) <= set(inspect.signature(Llama.__init__).parameters)
        engine = set(inspect.signature(BatchSession.__init__).parameters) | set(
            inspect.signature(build).parameters
        )
        assert set(kw) <= engine
        sampling = _sampling_defaults(args)
        assert (sampling["temperature"], sampling["top_k"], sampling["seed"]) == (0.3, 7, 5)
        assert set(sampling) <= set(_Common.model_fields)
    assert _sampling(args)["temperature"] == 0.3 and _sampling(args)["max_tokens"] == 128
