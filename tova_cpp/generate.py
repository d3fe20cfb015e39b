"""Generation over a Session, stacked as mlx-lm stacks it: `generate_step` (one sampled token at a time)
-> `stream_generate` (one GenerationResponse record per token: text, timings, cache state, finish reason)
-> `generate` (the whole text). `tova_cpp.Llama` builds llama-cpp-python's OpenAI-shaped results on top.

Sampling runs through llama.cpp's sampler chain, built in the order llama-cpp-python builds it (logit bias,
penalties, grammar, then greedy / mirostat / top-k, typical, top-p, min-p, temperature, distribution), so a
seed and a set of parameters pick the same tokens in both.
"""

from __future__ import annotations

import codecs
import ctypes
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import llama_cpp
import numpy as np

from .errors import NumericalError
from .session import Session


def token_piece(vocab, token: int, special: bool = False) -> bytes:
    """The bytes llama.cpp renders for one token (the one token-to-piece helper of the package)."""
    buf = ctypes.create_string_buffer(64)
    n = llama_cpp.llama_token_to_piece(vocab, int(token), buf, len(buf), 0, special)
    if n < 0:  # the piece is longer than the buffer: llama.cpp returns minus the size it needs
        buf = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_token_to_piece(vocab, int(token), buf, len(buf), 0, special)
    return buf.raw[: max(n, 0)]


def detokenize(vocab, tokens: Sequence[int], special: bool = False) -> bytes:
    return b"".join(token_piece(vocab, t, special) for t in tokens)


def log_normalizer(logits: np.ndarray) -> float:
    """log(sum(exp(logits))), the logprob of token t being logits[t] minus this: the largest logit plus the log of
    the float32 sum of exp(logits - largest), within 1e-5 of the float64 value (tests/test_sampling.py) at a
    fraction of np.logaddexp.reduce's cost. -inf entries count as zero probability."""
    top = float(logits.max())
    if not math.isfinite(top):
        return top
    return top + math.log(float(np.exp(logits - np.float32(top)).sum()))


@dataclass
class GenerationResponse:
    """One generated token, as mlx-lm's stream_generate yields it (plus the bounded cache's state).

    text: the new text of this step (may be "" while a multi-byte character or a possible stop string is
    held back); token: the sampled id (-1 on a record that only closes the stream); logprob: its
    log-probability under the raw logits; prompt_tokens: tokens of the whole prompt;
    prompt_tokens_evaluated / prompt_tps: the prompt tokens this call evaluated (the cache may already hold
    the rest) and their speed; generation_tokens / generation_tps: tokens generated so far and the decode
    speed; n_occupied: cells holding a token now; kv_bytes: bytes those cells occupy over all layers (K + V);
    peak_memory: the process's peak resident memory in GB; finish_reason: None, "stop" or "length"."""

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
    prompt_tokens_evaluated: int = 0


def _peak_rss_gb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024) / 1e9


class Sampler:
    """A llama.cpp sampler chain (freed by `close`, which is safe to call twice)."""

    def __init__(
        self,
        session: Session,
        *,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        repeat_penalty: float = 1.0,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        penalty_last_n: int = 64,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        seed: int | None = None,
        logit_bias: dict[int, float] | None = None,
        grammar=None,
        ignore_eos: bool = False,
    ) -> None:
        for name, value in (
            ("temperature", temperature),
            ("top_p", top_p),
            ("min_p", min_p),
            ("typical_p", typical_p),
            ("repeat_penalty", repeat_penalty),
            ("frequency_penalty", frequency_penalty),
            ("presence_penalty", presence_penalty),
            ("mirostat_tau", mirostat_tau),
            ("mirostat_eta", mirostat_eta),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if mirostat_mode not in (0, 1, 2):
            raise ValueError(f"mirostat_mode must be 0, 1 or 2, got {mirostat_mode!r}")
        if seed is None or seed == llama_cpp.LLAMA_DEFAULT_SEED:
            seed = int.from_bytes(os.urandom(4), "little")
        seed &= 0xFFFFFFFF
        n_vocab = session.n_vocab
        bias = {}
        for tok, value in (logit_bias or {}).items():
            tok = int(tok)  # OpenAI sends the ids as strings
            if not 0 <= tok < n_vocab:
                raise ValueError(f"logit_bias token id {tok} is out of range [0, {n_vocab})")
            bias[tok] = float(value)
        if ignore_eos:  # llama.cpp's --ignore-eos: a -inf bias on every end-of-generation token
            bias.update({t: -math.inf for t in range(n_vocab) if session.is_eog(t)})
        self.chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = lambda s: llama_cpp.llama_sampler_chain_add(self.chain, s)  # noqa: E731
        if bias:
            arr = (llama_cpp.llama_logit_bias * len(bias))(
                *[llama_cpp.llama_logit_bias(t, b) for t, b in bias.items()]
            )
            add(llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(bias), arr))
        add(
            llama_cpp.llama_sampler_init_penalties(
                n_vocab, penalty_last_n, repeat_penalty, frequency_penalty, presence_penalty
            )
        )
        if grammar is not None:  # a llama_cpp.LlamaGrammar: its GBNF text and root rule
            g = llama_cpp.llama_sampler_init_grammar(
                session._vocab, grammar._grammar.encode(), grammar._root.encode()
            )
            if not g:
                self.close()
                raise ValueError("llama.cpp could not parse the grammar")
            add(g)
        if temperature < 0:
            add(llama_cpp.llama_sampler_init_dist(seed))
        elif temperature == 0:
            add(llama_cpp.llama_sampler_init_greedy())
        elif mirostat_mode == 1:
            add(llama_cpp.llama_sampler_init_mirostat(n_vocab, seed, mirostat_tau, mirostat_eta, 100))
        elif mirostat_mode == 2:
            add(llama_cpp.llama_sampler_init_mirostat_v2(seed, mirostat_tau, mirostat_eta))
        else:
            add(llama_cpp.llama_sampler_init_top_k(top_k))
            add(llama_cpp.llama_sampler_init_typical(typical_p, 1))
            add(llama_cpp.llama_sampler_init_top_p(top_p, 1))
            add(llama_cpp.llama_sampler_init_min_p(min_p, 1))
            add(llama_cpp.llama_sampler_init_temp(temperature))
            add(llama_cpp.llama_sampler_init_dist(seed))
        # llama.cpp's greedy sampler with nothing before it that changes a logit (its penalties sampler is off
        # exactly when penalty_last_n <= 0 or all three are neutral): the token is the first largest logit
        self.greedy = (
            temperature == 0
            and not bias
            and grammar is None
            and (
                penalty_last_n <= 0
                or (repeat_penalty == 1 and frequency_penalty == 0 and presence_penalty == 0)
            )
        )

    def sample(self, session: Session) -> int:
        return int(llama_cpp.llama_sampler_sample(self.chain, session._ctx, -1))

    def close(self) -> None:
        if self.chain is not None:
            llama_cpp.llama_sampler_free(self.chain)
            self.chain = None


def generate_step(
    session: Session,
    prompt: Sequence[int],
    sampler: Sampler,
    *,
    top_logprobs: int = 0,
    stopping_criteria: Callable | None = None,
    history: Sequence[int] = (),
    progress: Callable[[int, int], bool | None] | None = None,
) -> Iterator[tuple[int, float, list[tuple[int, float]] | None]]:
    """Evaluate `prompt` (the tokens the cache does not hold yet), then yield (token, logprob, top) for each
    sampled token without end. A token enters the cache only when the next one is asked for, so the last
    token of a generation that stops is never evaluated. Raises NumericalError on NaN/inf logits.

    stopping_criteria: llama-cpp-python's (input_ids, logits) -> bool, given the tokens evaluated so far
    (`history`, the cache's earlier tokens, + prompt + generated); True ends the generation."""
    ids = list(history) + list(prompt)
    session.eval(prompt, progress=progress)
    while True:
        logits = session.logits()
        if not np.isfinite(logits).all():
            bad = int((~np.isfinite(logits)).sum())
            raise NumericalError(
                f"the model produced {bad} non-finite logits (NaN or inf): its weights or the input are "
                "corrupt; nothing was sampled"
            )
        if stopping_criteria is not None and stopping_criteria(np.asarray(ids, dtype=np.intc), logits):
            return
        tok = sampler.sample(session)
        lse = log_normalizer(logits)
        top = None
        if top_logprobs:
            k = min(top_logprobs, logits.size)  # more than the vocabulary: all of it, as llama-cpp-python
            idx = np.argpartition(-logits, k - 1)[:k]
            idx = idx[np.argsort(-logits[idx], kind="stable")]
            top = [(int(i), float(logits[i]) - lse) for i in idx]
        yield tok, float(logits[tok]) - lse, top
        session.eval([tok])
        ids.append(tok)


def _stop_hold(text: str, stops: list[str]) -> int:
    """How many trailing characters of `text` could start one of `stops` (held back while streaming)."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


def check_max_tokens(max_tokens) -> int | None:
    """llama-cpp-python's meaning: None, 0 or < 0 is no limit (here: constant memory, no context limit)."""
    if max_tokens is None:
        return None
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise TypeError(f"max_tokens must be an int or None, got {max_tokens!r}")
    return None if max_tokens <= 0 else max_tokens


def check_stops(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(s, str) or not s for s in stops):
        raise ValueError("stop strings must be non-empty str")
    return stops


def stream_generate(
    session: Session,
    prompt: str | Sequence[int],
    *,
    max_tokens: int | None = 256,
    stop: str | Sequence[str] | None = None,
    top_logprobs: int = 0,
    stopping_criteria: Callable | None = None,
    prompt_tokens: int | None = None,
    history: Sequence[int] = (),
    progress: Callable[[int, int], bool | None] | None = None,
    sampler: Sampler | None = None,
    **sampling,
) -> Iterator[GenerationResponse]:
    """Evaluate `prompt` (text, tokenized with BOS and special tokens, or token ids: the tokens the cache
    does not hold yet) and yield one GenerationResponse per generated token. The last one carries
    finish_reason "stop" (end of generation, a stop string or stopping_criteria) or "length".

    max_tokens None or <= 0: until end of generation, in constant memory. prompt_tokens: the whole prompt's
    length when the cache already holds its beginning (`history`). Sampling keywords go to `Sampler`
    (temperature, top_k, top_p, min_p, typical_p, repeat_penalty, frequency_penalty, presence_penalty,
    mirostat_*, seed, logit_bias, grammar, ignore_eos), or pass a `sampler`."""
    max_tokens = check_max_tokens(max_tokens)
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("the prompt is empty")
        prompt = session.tokenize(prompt, add_special=True, parse_special=True)
    prompt = list(prompt)
    if not prompt:
        raise ValueError("the prompt is empty")
    stops = check_stops(stop)
    if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) or top_logprobs < 0:
        raise ValueError(f"top_logprobs must be an integer >= 0, got {top_logprobs!r}")
    own = sampler is None
    if own:
        sampler = Sampler(session, **sampling)
    elif sampling:
        raise TypeError(f"give sampling keywords or a sampler, not both: {sorted(sampling)}")
    return _stream(
        session,
        prompt,
        sampler,
        own,
        max_tokens,
        stops,
        top_logprobs,
        stopping_criteria,
        prompt_tokens if prompt_tokens is not None else len(history) + len(prompt),
        history,
        progress,
    )


def _stream(
    session, prompt, sampler, own, max_tokens, stops, top_logprobs, criteria, n_prompt, history, progress
):
    row_bytes = None

    def response(text, tok, logprob, n_gen, reason, top=None):
        nonlocal row_bytes
        if row_bytes is None:
            try:
                row_bytes = session.kv_row_bytes()
            except ValueError:  # per-layer sizes: no single row size
                row_bytes = 0
        dt = time.perf_counter() - t1
        n_occ = session.n_occupied
        return GenerationResponse(
            text=text,
            token=tok,
            logprob=logprob,
            prompt_tokens=n_prompt,
            prompt_tps=len(prompt) / max(t1 - t0, 1e-9),
            generation_tokens=n_gen,
            generation_tps=n_gen / max(dt, 1e-9),
            n_occupied=n_occ,
            kv_bytes=n_occ * row_bytes,
            peak_memory=_peak_rss_gb(),
            finish_reason=reason,
            top_logprobs=top,
            prompt_tokens_evaluated=len(prompt),
        )

    t0 = t1 = time.perf_counter()
    steps = generate_step(
        session,
        prompt,
        sampler,
        top_logprobs=top_logprobs,
        stopping_criteria=criteria,
        history=history,
        progress=progress,
    )
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text, emitted, n_gen = "", 0, 0
    try:
        for tok, logprob, top in steps:
            if n_gen == 0:
                t1 = time.perf_counter()  # the prompt is evaluated once the first token is sampled
            if session.is_eog(tok):
                yield response(text[emitted:], tok, logprob, n_gen, "stop", top)
                return
            n_gen += 1
            text += decoder.decode(token_piece(session._vocab, tok))
            hit = min((i for i in (text.find(x) for x in stops) if i >= 0), default=-1)
            if hit >= 0:
                yield response(text[emitted:hit], tok, logprob, n_gen, "stop", top)
                return
            last = max_tokens is not None and n_gen >= max_tokens
            if last:
                text += decoder.decode(b"", final=True)
                yield response(text[emitted:], tok, logprob, n_gen, "length", top)
                return
            upto = len(text) - _stop_hold(text, stops)
            piece, emitted = text[emitted:upto], max(emitted, upto)
            yield response(piece, tok, logprob, n_gen, None, top)
        if n_gen == 0:
            t1 = time.perf_counter()
        # stopping_criteria ended the generation
        yield response(text[emitted:] + decoder.decode(b"", final=True), -1, 0.0, n_gen, "stop")
    finally:
        steps.close()
        if own:
            sampler.close()


def generate(session: Session, prompt: str | Sequence[int], **kwargs) -> str:
    """The whole generated text (stream_generate's keywords)."""
    return "".join(r.text for r in stream_generate(session, prompt, **kwargs))
