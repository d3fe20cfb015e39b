"""The FastAPI app of `tova serve`: OpenAI's /v1/completions, /v1/chat/completions (SSE streams or not),
/v1/models, plus /health and /metrics (Prometheus text).

Shapes follow llama-cpp-python's server (llama_cpp/server/app.py): the same request fields, chunks that end
with `data: [DONE]`, errors as {"error": {"message", "type", "param", "code"}}. Every endpoint but /health
needs the API key when one is set (Bearer). Bad input is a 4xx in that shape; any other failure is a 500
whose body says only "internal server error" (the traceback goes to the server's stderr). A client that
disconnects cancels its generation, which frees its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import time

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from jinja2.exceptions import SecurityError, TemplateError
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..errors import TokenizerError
from . import protocol as P
from .scheduler import Job, QueueFull, Scheduler

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class _Guard:
    """ASGI middleware: refuses bodies over `max_body_bytes` (413, before they are read whole) and counts
    responses by endpoint and status for /metrics."""

    def __init__(self, app, *, max_body_bytes: int, counts: dict) -> None:
        self.app, self.max_body_bytes, self.counts = app, max_body_bytes, counts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status = {"code": 500}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            await _send_json(counting_send, 413, _too_large(self.max_body_bytes))
        else:
            seen = 0

            async def limited_receive():
                nonlocal seen
                message = await receive()
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:  # chunked bodies have no Content-Length
                    raise HTTPException(413, _too_large(self.max_body_bytes)["error"]["message"])
                return message

            await self.app(scope, limited_receive, counting_send)
        key = (path, str(status["code"]))
        self.counts[key] = self.counts.get(key, 0) + 1


def _too_large(limit: int) -> dict:
    return P.error_body(
        f"request body exceeds {limit} bytes (tova serve --max-body-bytes)", code="body_too_large"
    )


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def _error(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
    return JSONResponse(P.error_body(message, type_, param, code), status_code=status)


def create_app(
    scheduler: Scheduler,
    vocab,
    limits: P.Limits,
    *,
    model_id: str,
    api_key: str | None = None,
    max_body_bytes: int = 8 * 2**20,
) -> FastAPI:
    counts: dict[tuple[str, str], int] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(scheduler.close)

    # no /docs or /openapi.json: every endpoint but /health sits behind the API key
    app = FastAPI(title="tova serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(_Guard, max_body_bytes=max_body_bytes, counts=counts)

    async def authenticate(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise HTTPException(401, "invalid API key: send it as 'Authorization: Bearer <key>'")

    auth = [Depends(authenticate)]

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        code = {401: "invalid_api_key", 404: "not_found", 413: "body_too_large"}.get(exc.status_code)
        type_ = "authentication_error" if exc.status_code == 401 else "invalid_request_error"
        return _error(exc.status_code, str(exc.detail), type_, code=code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        message = (
            f"{where}: {first.get('msg', 'invalid request')}"
            if where
            else first.get("msg", "invalid request")
        )
        return _error(400, message, param=loc[0] if loc else None)

    @app.exception_handler(P.BadRequest)
    async def bad_request(request, exc: P.BadRequest):
        return _error(400, str(exc), param=exc.param, code=exc.code)

    async def template_refused(request, exc: Exception):
        return _error(400, f"the chat template was refused: {exc}", param="messages")

    app.add_exception_handler(SecurityError, template_refused)
    app.add_exception_handler(TemplateError, template_refused)

    @app.exception_handler(TokenizerError)
    async def tokenizer_error(request, exc: TokenizerError):
        return _error(400, str(exc), param="prompt")

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        # Starlette logs the traceback to the server's stderr; the client learns nothing of it
        return _error(500, "internal server error", "server_error")

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "slots_idle": len(scheduler.slots) - scheduler.busy_slots,
            "slots_processing": scheduler.busy_slots,
        }

    @app.get("/v1/models", dependencies=auth)
    async def models():
        return {
            "object": "list",
            "data": [
                {"id": model_id, "object": "model", "created": 0, "owned_by": "tova_cpp", "permissions": []}
            ],
        }

    @app.get("/metrics", dependencies=auth)
    async def metrics():
        return PlainTextResponse(_metrics(scheduler, counts), media_type="text/plain; version=0.0.4")

    async def submit(request: Request, req) -> tuple[Job, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def post(event: dict) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown): nobody is listening
                loop.call_soon_threadsafe(events.put_nowait, event)

        job = Job(req, post)
        try:
            scheduler.submit(job)
        except QueueFull as e:
            req.sampler.close()
            raise HTTPException(503, f"server busy: {e}; retry later") from None
        return job, events

    async def collect(request: Request, job: Job, events: asyncio.Queue) -> tuple[list[dict], dict]:
        """All of a job's token events and its last event; a client that leaves cancels the job."""
        tokens, done = [], False
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), 0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return tokens, {"error": "client disconnected", "status": 499}
                    continue
                if "token" in event:
                    tokens.append(event)
                    continue
                done = True
                return tokens, event
        finally:
            if not done:
                scheduler.cancel(job)

    def raise_failure(last: dict) -> None:
        if "error" in last:
            status = last["status"]
            type_ = "server_error" if status >= 500 else "invalid_request_error"
            raise _Failure(status, last["error"], type_)

    async def stream(job: Job, events: asyncio.Queue, chunks):
        """SSE events from a job's events through `chunks` (a generator taking events); [DONE] at the end.
        Cancelled when the client leaves (sse-starlette cancels this task): the job is cancelled then."""
        done = False
        try:
            gen = chunks()
            next(gen)
            while True:
                event = await events.get()
                if "error" in event:
                    done = True
                    yield {"data": json.dumps(P.error_body(event["error"], "server_error"))}
                    return
                for chunk in gen.send(event):
                    yield {"data": json.dumps(chunk)}
                if "finish_reason" in event:
                    done = True
                    yield {"data": "[DONE]"}
                    return
        finally:
            if not done:
                scheduler.cancel(job)

    # -- /v1/completions ----------------------------------------------------------------------------------
    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request, body: P.CompletionRequest):
        def prepare():
            prompt, text = P.completion_prompt(body, vocab)
            return P.build_request(body, prompt, [], limits, vocab), text

        req, prompt_text = await run_in_threadpool(prepare)
        job, events = await submit(request, req)
        meta = {"id": P.new_id("cmpl"), "object": "text_completion", "created": P.now(), "model": model_id}
        echo = prompt_text if body.echo else ""
        want_lp = body.logprobs is not None

        def choice(text, reason, evs, offset=0):
            lp = P.completion_logprobs(vocab, evs, offset) if want_lp else None
            return {"text": text, "index": 0, "logprobs": lp, "finish_reason": reason}

        if not body.stream:
            tokens, last = await collect(request, job, events)
            raise_failure(last)
            text = echo + "".join(e["text"] for e in tokens)
            return dict(
                meta, choices=[choice(text, last["finish_reason"], tokens, len(echo))], usage=last["usage"]
            )
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        def chunks():
            event = yield
            out = [dict(meta, choices=[choice(echo, None, [])])] if echo else []
            offset = len(echo)
            while True:
                if "token" in event and (event["token"] >= 0 or event["text"]):
                    out.append(dict(meta, choices=[choice(event["text"], None, [event], offset)]))
                    offset += len(event["text"])
                if "finish_reason" in event:
                    out.append(dict(meta, choices=[choice("", event["finish_reason"], [])]))
                    if include_usage:
                        out.append(dict(meta, choices=[], usage=event["usage"]))
                event, out = (yield out), []

        return EventSourceResponse(stream(job, events, chunks))

    # -- /v1/chat/completions --------------------------------------------------------------------------
    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request, body: P.ChatRequest):
        def prepare():
            messages = P.chat_messages(body)
            try:
                text, stops = vocab.chat_prompt(messages)
            except (ValueError, KeyError, TypeError) as e:  # no template, or one that wants other fields
                raise P.BadRequest(
                    f"the chat template could not render these messages: {e}", "messages"
                ) from None
            prompt = vocab.tokenize(text, add_special=True, parse_special=True)
            return P.build_request(body, prompt, stops, limits, vocab)

        req = await run_in_threadpool(prepare)
        job, events = await submit(request, req)
        meta = {"id": P.new_id("chatcmpl"), "created": P.now(), "model": model_id}
        want_lp = bool(body.logprobs)
        if not body.stream:
            tokens, last = await collect(request, job, events)
            raise_failure(last)
            message = {"role": "assistant", "content": "".join(e["text"] for e in tokens)}
            choice = {
                "index": 0,
                "message": message,
                "logprobs": P.chat_logprobs(vocab, tokens) if want_lp else None,
                "finish_reason": last["finish_reason"],
            }
            return dict(meta, object="chat.completion", choices=[choice], usage=last["usage"])
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        meta["object"] = "chat.completion.chunk"

        def chunk(delta, reason=None, evs=()):
            lp = P.chat_logprobs(vocab, list(evs)) if want_lp and evs else None
            return dict(meta, choices=[{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": reason}])

        def chunks():
            event = yield
            out = [chunk({"role": "assistant", "content": ""})]
            while True:
                if "token" in event and (event["token"] >= 0 or event["text"]):
                    out.append(chunk({"content": event["text"]}, None, [event]))
                if "finish_reason" in event:
                    out.append(chunk({}, event["finish_reason"]))
                    if include_usage:
                        out.append(dict(meta, choices=[], usage=event["usage"]))
                event, out = (yield out), []

        return EventSourceResponse(stream(job, events, chunks))

    @app.exception_handler(_Failure)
    async def failure(request, exc: _Failure):
        return _error(exc.status, exc.message, exc.type_)

    return app


class _Failure(Exception):
    """A job that ended in an error (non-streaming): its status and message go to the client."""

    def __init__(self, status: int, message: str, type_: str) -> None:
        super().__init__(message)
        self.status, self.message, self.type_ = status, message, type_


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _metrics(s: Scheduler, counts: dict) -> str:
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            label = ",".join(f'{k}="{v}"' for k, v in labels.items())
            lines.append(f"{name}{{{label}}} {value}" if label else f"{name} {value}")

    st = s.stats
    metric(
        "tova_requests_total",
        "counter",
        "HTTP requests by endpoint and status code",
        [({"endpoint": p, "status": c}, n) for (p, c), n in sorted(counts.items())],
    )
    metric(
        "tova_generations_total",
        "counter",
        "Generations by how they ended (stop, length, cancelled, error)",
        [({"finish_reason": r}, n) for r, n in sorted(st.finished.items())],
    )
    metric("tova_queue_length", "gauge", "Requests waiting for a slot", [({}, s.queue_length)])
    metric("tova_slots", "gauge", "Slots (sequences of the engine)", [({}, len(s.slots))])
    metric("tova_slots_busy", "gauge", "Slots generating for a request", [({}, s.busy_slots)])
    metric(
        "tova_slot_cells_occupied",
        "gauge",
        "KV cells holding a token, per slot",
        [({"slot": str(x.index)}, x.n_occupied) for x in s.slots],
    )
    metric(
        "tova_slot_budget",
        "gauge",
        "KV cells a slot keeps per layer",
        [({"slot": str(x.index)}, x.budget) for x in s.slots],
    )
    metric(
        "tova_slot_tokens_seen",
        "gauge",
        "Tokens of the conversation a slot holds (kept or evicted)",
        [({"slot": str(x.index)}, len(x.tokens)) for x in s.slots],
    )
    metric(
        "tova_prompt_tokens_evaluated_total",
        "counter",
        "Prompt tokens evaluated",
        [({}, st.prompt_tokens_evaluated)],
    )
    metric(
        "tova_prompt_tokens_reused_total",
        "counter",
        "Prompt tokens a slot's cache already held",
        [({}, st.prompt_tokens_reused)],
    )
    metric("tova_generated_tokens_total", "counter", "Tokens generated", [({}, st.generated_tokens)])
    metric(
        "tova_evicted_tokens_total", "counter", "Tokens evicted from the caches", [({}, st.evicted_tokens)]
    )
    metric("tova_decode_steps_total", "counter", "Batched decode steps", [({}, st.steps)])
    metric(
        "tova_decode_seconds_total",
        "counter",
        "Seconds spent in batched decode steps",
        [({}, round(st.step_seconds, 6))],
    )
    metric("tova_parked_total", "counter", "Conversations parked to --park-dir", [({}, st.parked)])
    metric("tova_resumed_total", "counter", "Parked conversations loaded back", [({}, st.resumed)])
    metric(
        "process_cpu_seconds_total",
        "counter",
        "CPU time of the server process, user and system (all its threads)",
        [({}, round(time.process_time(), 3))],
    )
    metric(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory of the server process",
        [({}, _resident_bytes())],
    )
    return "\n".join(lines) + "\n"
