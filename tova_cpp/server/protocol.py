"""OpenAI request and response shapes for `tova serve`, with the fields of llama-cpp-python's server
(llama_cpp/server/types.py) plus tova's own: `budget` (cells kept per layer, at most the server's),
`policy` (the server's only: one engine runs one policy) and `keep` (protected prefix tokens).

Refused with a 400, by name: n > 1 / best_of > 1, suffix (fill-in-the-middle), tools / functions, and
message parts other than text. Fields a request leaves out take the server's values (its sampling flags).
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..generate import Sampler, check_stops
from .scheduler import Request


class BadRequest(ValueError):
    """A request the server refuses: a 400 in OpenAI's error shape naming `param`."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


def error_body(message: str, type_: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class _Common(BaseModel):
    """Fields shared by completions and chat (llama-cpp-python's names and ranges)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    min_tokens: int = Field(default=0, ge=0)
    temperature: float = Field(default=0.8, ge=0.0, le=2.0)
    top_p: float = Field(default=0.95, ge=0.0, le=1.0)
    min_p: float = Field(default=0.05, ge=0.0, le=1.0)
    typical_p: float = Field(default=1.0, ge=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logit_bias_type: Literal["input_ids", "tokens"] | None = None
    seed: int | None = None
    n: int | None = 1
    user: str | None = None
    top_k: int = Field(default=40, ge=0)
    repeat_penalty: float = Field(default=1.0, ge=0.0)
    mirostat_mode: int = Field(default=0, ge=0, le=2)
    mirostat_tau: float = Field(default=5.0, ge=0.0, le=10.0)
    mirostat_eta: float = Field(default=0.1, ge=0.001, le=1.0)
    grammar: str | None = None
    # tova_cpp's own
    budget: int | None = Field(default=None, ge=1)
    policy: str | None = None
    keep: int | None = Field(default=None, ge=0)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]] = ""
    suffix: str | None = None
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    best_of: int | None = 1


class ChatRequest(_Common):
    temperature: float = Field(default=0.2, ge=0.0, le=2.0)
    messages: list[dict[str, Any]] = Field(default_factory=list)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None


# request field -> (CLI default key, Sampler keyword)
_SAMPLING = {
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "typical_p": "typical_p",
    "repeat_penalty": "repeat_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "mirostat_mode": "mirostat_mode",
    "mirostat_tau": "mirostat_tau",
    "mirostat_eta": "mirostat_eta",
}


class Limits:
    """The server's settings a request is checked against."""

    def __init__(
        self,
        *,
        budget: int,
        policy: str,
        keep: int,
        max_tokens: int,
        defaults: dict | None = None,
        stops: list[str] | None = None,
        penalty_last_n: int = 64,
    ) -> None:
        self.stops = list(stops or [])
        self.budget, self.policy, self.keep, self.max_tokens = budget, policy, keep, max_tokens
        self.defaults = defaults or {}
        self.penalty_last_n = penalty_last_n


def _max_tokens(value: int | None, limits: Limits, param: str) -> int:
    """None, 0 or < 0 (llama-cpp-python: no limit) is the server's limit; more than it is refused."""
    if value is None or value <= 0:
        return limits.max_tokens
    if value > limits.max_tokens:
        raise BadRequest(
            f"{param}={value} exceeds this server's limit of {limits.max_tokens} (tova serve "
            "--max-tokens-limit)",
            param,
        )
    return value


def _grammar(text: str | None, response_format: dict | None):
    from llama_cpp import LlamaGrammar
    from llama_cpp.llama_grammar import JSON_GBNF

    try:
        if text is not None:
            return LlamaGrammar.from_string(text, verbose=False)
        if response_format is None or response_format.get("type", "text") == "text":
            return None
        kind = response_format.get("type")
        if kind == "json_schema":
            schema = (response_format.get("json_schema") or {}).get("schema")
        elif kind == "json_object":
            schema = response_format.get("schema")
        else:
            raise BadRequest(f"response_format type {kind!r} is not supported", "response_format")
        if schema is None:
            return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
        return LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
    except (ValueError, RuntimeError, TypeError) as e:
        if isinstance(e, BadRequest):
            raise
        raise BadRequest(
            f"invalid grammar: {e}", "grammar" if text is not None else "response_format"
        ) from None


def build_request(body: _Common, prompt: list[int], stops: list[str], limits: Limits, vocab) -> Request:
    """Check tova's fields and the sampling settings and turn them into a scheduler Request (the Sampler
    owns a llama.cpp sampler chain: the scheduler frees it)."""
    if body.n not in (None, 1) or getattr(body, "best_of", 1) not in (None, 1):
        raise BadRequest("n > 1 and best_of > 1 are not supported: send one request per completion", "n")
    if body.policy is not None and body.policy != limits.policy:
        raise BadRequest(
            f"policy {body.policy!r}: this server runs policy {limits.policy!r} only (tova serve --policy)",
            "policy",
        )
    if body.budget is not None and body.budget > limits.budget:
        raise BadRequest(
            f"budget={body.budget} exceeds this server's budget of {limits.budget} cells per layer", "budget"
        )
    budget = body.budget or limits.budget
    keep = limits.keep if body.keep is None else body.keep
    if keep >= budget:
        raise BadRequest(f"keep={keep} must be < budget={budget}", "keep")
    try:
        stops = check_stops(body.stop) + stops + limits.stops
    except (ValueError, TypeError) as e:
        raise BadRequest(str(e), "stop") from None
    given = body.model_fields_set
    sampling = {
        kw: (getattr(body, name) if name in given or name not in limits.defaults else limits.defaults[name])
        for name, kw in _SAMPLING.items()
    }
    sampling = {k: (0.0 if v is None else v) for k, v in sampling.items()}
    bias = body.logit_bias
    if bias and body.logit_bias_type == "tokens":
        bias = {str(t): v for text, v in bias.items() for t in vocab.tokenize(text, add_special=False)}
    try:
        logit_bias = {int(k): float(v) for k, v in (bias or {}).items()}
    except ValueError:
        raise BadRequest("logit_bias keys must be token ids", "logit_bias") from None
    grammar = _grammar(body.grammar, getattr(body, "response_format", None))
    seed = body.seed if "seed" in given else limits.defaults.get("seed")
    try:
        sampler = Sampler(
            vocab,
            seed=seed,
            logit_bias=logit_bias,
            grammar=grammar,
            penalty_last_n=limits.penalty_last_n,
            **sampling,
        )
    except ValueError as e:
        raise BadRequest(str(e), "grammar" if grammar is not None else None) from None
    if isinstance(body, ChatRequest):
        n_max = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    else:
        n_max, logprobs, param = body.max_tokens, body.logprobs, "max_tokens"
    try:
        max_tokens = _max_tokens(n_max, limits, param)
    except BadRequest:
        sampler.close()
        raise
    return Request(
        prompt=prompt,
        sampler=sampler,
        max_tokens=max_tokens,
        stop=stops,
        min_tokens=body.min_tokens,
        logprobs=logprobs,
        budget=budget if budget != limits.budget else None,
        keep=keep if keep != limits.keep else None,
    )


def completion_prompt(body: CompletionRequest, vocab) -> tuple[list[int], str]:
    """The prompt's tokens and its text (for echo)."""
    if body.suffix is not None:
        raise BadRequest("suffix (fill-in-the-middle) is not supported", "suffix")
    p = body.prompt
    if isinstance(p, list) and p and isinstance(p[0], (str, list)):
        if len(p) != 1:
            raise BadRequest(
                "send one prompt per request (a list of several prompts is not supported)", "prompt"
            )
        p = p[0]
    if isinstance(p, str):
        if not p:
            raise BadRequest("the prompt is empty", "prompt")
        return vocab.tokenize(p, add_special=True, parse_special=True), p
    if not p:
        raise BadRequest("the prompt is empty", "prompt")
    if any(not 0 <= t < vocab.n_vocab for t in p):
        raise BadRequest(f"prompt token ids must be in [0, {vocab.n_vocab})", "prompt")
    return list(p), vocab.detokenize(p).decode(errors="replace")


_ROLES = {"system", "user", "assistant", "tool", "function", "developer"}


def chat_messages(body: ChatRequest) -> list[dict]:
    """The messages as the chat template takes them: text content only (parts joined), developer -> system."""
    if body.tools or body.functions or body.tool_choice not in (None, "none") or body.function_call:
        raise BadRequest("tools and functions are not supported by tova serve", "tools")
    if not body.messages:
        raise BadRequest("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(body.messages):
        role = m.get("role")
        if role not in _ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {sorted(_ROLES)}, got {role!r}", "messages")
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if (
                    not isinstance(part, dict)
                    or part.get("type") != "text"
                    or not isinstance(part.get("text"), str)
                ):
                    raise BadRequest(f"messages[{i}]: only text content parts are supported", "messages")
                texts.append(part["text"])
            content = "".join(texts)
        elif content is not None and not isinstance(content, str):
            raise BadRequest(
                f"messages[{i}].content must be a string, a list of text parts or null", "messages"
            )
        msg = {"role": "system" if role == "developer" else role, "content": content or ""}
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        out.append(msg)
    return out


# -- responses ----------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    import uuid

    return f"{prefix}-{uuid.uuid4().hex}"


def completion_logprobs(vocab, events: list[dict], offset: int) -> dict:
    """llama-cpp-python's completion logprobs: tokens, text_offset, token_logprobs, top_logprobs."""
    out = {"tokens": [], "text_offset": [], "token_logprobs": [], "top_logprobs": []}
    for e in events:
        if e.get("token", -1) < 0 or "logprob" not in e:
            continue
        text = vocab.piece(e["token"]).decode(errors="replace")
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        out["token_logprobs"].append(e["logprob"])
        top = {vocab.piece(t).decode(errors="replace"): lp for t, lp in e.get("top") or []}
        top[text] = e["logprob"]
        out["top_logprobs"].append(top)
    return out


def chat_logprobs(vocab, events: list[dict]) -> dict:
    """OpenAI's chat logprobs: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""

    def entry(tok: int, lp: float) -> dict:
        b = vocab.piece(tok)
        return {"token": b.decode(errors="replace"), "logprob": lp, "bytes": list(b)}

    content = []
    for e in events:
        if e.get("token", -1) < 0 or "logprob" not in e:
            continue
        item = entry(e["token"], e["logprob"])
        item["top_logprobs"] = [entry(t, lp) for t, lp in e.get("top") or []]
        content.append(item)
    return {"content": content}


def now() -> int:
    return int(time.time())
