"""`tova serve` as a real process on a free port, driven by the official `openai` client: completions, chat,
streaming, errors, the API key, the limits, cancellation, prefix reuse, and a load test of 32 concurrent
multi-turn conversations (docs/SERVER.md has the larger run: scripts/load_server.py)."""

from __future__ import annotations

import contextlib
import json
import random
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
def run_server(model, *args: str):
    """A `tova serve` process on a free port; yields (base url, process). Stopped with SIGTERM."""
    port = _free_port()
    cmd = [sys.executable, "-m", "tova_cpp", "serve", "-m", str(model), "--port", str(port), "-t", "1", *args]
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


# -- load: 32 concurrent multi-turn conversations -------------------------------------------------------

_WORDS = (
    "river mountain city engine garden history music science ocean forest market letter window station "
    "harbor bridge winter summer lantern pocket silver copper meadow valley thunder whisper candle"
).split()


def conversation_turns(seed: int, n_turns: int, words_per_turn: int) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(_WORDS) for _ in range(words_per_turn)) + f". Summarize part {t + 1}."
        for t in range(n_turns)
    ]


def run_conversation(url: str, turns: list[str], max_tokens: int) -> list[dict]:
    """One client's multi-turn conversation, streamed; per turn its text, finish reason, usage and the
    top-5 logprobs of every token."""
    c = _client(url)
    messages, out = [{"role": "system", "content": "You are a terse assistant."}], []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        stream = c.chat.completions.create(
            model="x",
            messages=messages,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            logprobs=True,
            top_logprobs=5,
            stream_options={"include_usage": True},
        )
        text, reason, usage, tops = "", None, None, []
        for ch in stream:
            if ch.usage is not None:
                usage = ch.usage
            if not ch.choices:
                continue
            text += ch.choices[0].delta.content or ""
            reason = ch.choices[0].finish_reason or reason
            for item in (ch.choices[0].logprobs.content or []) if ch.choices[0].logprobs else []:
                tops.append((item.token, [(t.token, t.logprob) for t in item.top_logprobs]))
        out.append({"text": text, "reason": reason, "usage": usage, "tops": tops})
        messages.append({"role": "assistant", "content": text})
    return out


def first_divergence(a: list, b: list) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x[0] != y[0]), None)


def test_load_32_concurrent_conversations(smollm2_path):
    """32 clients, each a 3-turn conversation far beyond the budget, streamed at once through 32 slots: no
    request fails, every stream ends with a finish reason and usage, the server's resident memory stays
    flat, and greedy streams equal the same conversations run alone (checked for a quarter of them), except
    from a point where llama.cpp's arithmetic differs between the two runs: the cells a sequence occupies
    move SmolLM2's logits by up to 1.8% of the largest one (scripts/kv_layout_check.py, which also shows
    that the other sequences' contents do not), and with TOVA a close score may then evict another token
    (docs/SERVER.md, "Batched arithmetic"). There, one run's token must be among the other's 5 most likely
    (not always both ways: once an eviction flipped, the two runs' distributions drift apart before their
    tokens do), and the scheduler must have fed both runs the same prompts (usage) up to that turn."""
    n_clients, n_turns, words, max_tokens = 32, 3, 80, 8
    args = ["--slots", str(n_clients), "--budget", "32", "--chunk", "32", "-b", "256", "--api-key", KEY]
    convs = [conversation_turns(i, n_turns, words) for i in range(n_clients)]
    with run_server(smollm2_path, *args) as (url, proc):
        results: dict[int, list] = {}
        errors: list[BaseException] = []
        rss: list[float] = []

        def client(i: int) -> None:
            try:
                results[i] = run_conversation(url, convs[i], max_tokens)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(n_clients)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            rss.append(_metric(url, "process_resident_memory_bytes"))
            time.sleep(1.0)
        assert not errors, errors[:3]
        assert _metric(url, "tova_requests_total", 'status="200"') >= n_clients * n_turns
        for i, turns in results.items():
            assert len(turns) == n_turns
            for t in turns:
                assert t["reason"] in ("stop", "length") and t["usage"] is not None, (i, t)
            assert turns[-1]["usage"].prompt_tokens > 250 and turns[-1]["usage"].reused_prompt_tokens > 0
        # flat memory: once every slot holds a full cache, growth stays within a few MiB
        settled = rss[len(rss) // 3 :]
        assert max(settled) - settled[0] < 32 * 2**20, [round(x / 2**20) for x in rss]
        # alone: the same conversations one at a time, on the same server
        identical = 0
        for i in range(0, n_clients, 4):
            alone = run_conversation(url, convs[i], max_tokens)
            for t, (got, want) in enumerate(zip(results[i], alone, strict=True)):
                for field in ("prompt_tokens", "reused_prompt_tokens"):
                    assert getattr(got["usage"], field) == getattr(want["usage"], field), (i, t, field)
                k = first_divergence(got["tops"], want["tops"])
                if k is None:
                    assert got["text"] == want["text"]
                    identical += 1
                    continue
                # the rest of the conversation differs by construction
                g_tok, g_top = got["tops"][k]
                w_tok, w_top = want["tops"][k]
                assert g_tok in [x for x, _ in w_top] or w_tok in [x for x, _ in g_top], (
                    i,
                    t,
                    k,
                    g_top,
                    w_top,
                )
                break
        print(
            f"\n{identical} of {n_turns * len(range(0, n_clients, 4))} turns identical to the turn run alone"
        )


def test_cli_flags():
    """`tova serve` takes llama.cpp server's -np / --parallel / -cb; `tova generate` still refuses them."""
    from tova_cpp.cli import _unsupported, build_parser, main

    assert _unsupported(["serve", "-np", "2", "-cb"]) is None
    assert "not supported" in _unsupported(["generate", "-np", "2"])
    args = build_parser().parse_args(["serve", "-np", "6", "--port", "0", "-c", "512"])
    assert (args.slots, args.port, args.budget, args.host, args.api_key) == (6, 0, 512, "127.0.0.1", None)
    assert main(["serve", "--grammar", "root ::= x"]) == 1  # per request only
