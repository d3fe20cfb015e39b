"""Host-side sampling of many sequences (tova_cpp.batch.sample_logits, tova_cpp.generate.log_normalizer): the
greedy fast path and the reused token-data array pick exactly the tokens of a fresh llama.cpp token-data array
run through the same chain (the path before them) and of llama_sampler_sample on a context (what Llama does);
the fast path is not taken when a logit bias, penalties or a grammar change logits; logprobs stay within
LSE_TOL of np.logaddexp.reduce in float64."""

from __future__ import annotations

import math
import re
import threading
from types import SimpleNamespace

import llama_cpp
import numpy as np
import pytest
from sampling_reference import reference_sample
from tiny_gguf import write_tiny_llama

from tova_cpp import Session
from tova_cpp.batch import sample_logits
from tova_cpp.generate import Sampler, log_normalizer

# |log_normalizer - float64 logaddexp.reduce|; the largest measured over the cases below was 3e-7
LSE_TOL = 1e-5
N_VOCAB = 3000
STEPS = 120

CHAINS = {
    "greedy": dict(temperature=0.0),
    "greedy, penalties off by penalty_last_n=0": dict(temperature=0.0, repeat_penalty=1.3, penalty_last_n=0),
    "greedy + repeat penalty": dict(temperature=0.0, repeat_penalty=1.3),
    "greedy + frequency penalty": dict(temperature=0.0, frequency_penalty=0.5),
    "greedy + presence penalty": dict(temperature=0.0, presence_penalty=0.5),
    "greedy + logit bias": dict(temperature=0.0, logit_bias={5: 3.0, 17: -2.0, 2999: 1.5}),
    "greedy + ignore_eos": dict(temperature=0.0, ignore_eos=True),
    "default chain": dict(),
    "full chain + penalties": dict(
        temperature=0.9, top_k=50, top_p=0.9, min_p=0.02, repeat_penalty=1.2, frequency_penalty=0.2
    ),
    "typical": dict(typical_p=0.7),
    "dist (temperature < 0)": dict(temperature=-1.0),
    "mirostat 1": dict(mirostat_mode=1),
    "mirostat 2": dict(mirostat_mode=2),
}
FAST = {"greedy", "greedy, penalties off by penalty_last_n=0"}


def vocab(n: int = N_VOCAB) -> SimpleNamespace:
    """What Sampler reads of a session when there is no grammar: the vocabulary size and its end tokens."""
    return SimpleNamespace(n_vocab=n, is_eog=lambda t: t in (0, 7))


def logit_stream(seed: int, n: int = N_VOCAB, steps: int = STEPS):
    """Logits with many exact ties (half-units), some -inf, now and then a tie for the largest: greedy must take
    the first; repeated tops so penalties bite."""
    rng = np.random.default_rng(seed)
    for i in range(steps):
        lg = (rng.integers(-20, 20, n) / 2).astype(np.float32)
        lg[rng.integers(0, n, 10)] = -np.inf
        if i % 3 == 0:
            lg[[11, 5, 2999]] = lg.max() + 1  # a three-way tie for the largest
        yield lg


@pytest.mark.parametrize("name", list(CHAINS))
def test_tokens_equal_the_fresh_array_path(name):
    kw = CHAINS[name]
    fast, ref = Sampler(vocab(), seed=11, **kw), Sampler(vocab(), seed=11, **kw)
    try:
        assert fast.greedy == (name in FAST)
        got = [sample_logits(fast, lg) for lg in logit_stream(1)]
        want = [reference_sample(ref, lg) for lg in logit_stream(1)]
        assert got == want
        assert len(set(got)) > 1 or name in FAST  # the chain sampled, it did not stick to one token
    finally:
        fast.close()
        ref.close()


def test_greedy_takes_the_first_largest_and_nan_goes_through_the_chain():
    s, r = Sampler(vocab(8), temperature=0.0), Sampler(vocab(8), temperature=0.0)
    try:
        cases = [
            [1, 3, 3, 2, 3, 0, 0, 0],
            [-np.inf] * 8,
            [0, np.inf, 1, np.inf, 0, 0, 0, 0],
            [np.nan, 1, 2, 2, 0, 0, 0, 0],  # llama.cpp: nothing compares above a NaN at 0 -> 0
            [1, np.nan, 2, 2, 0, 0, 0, 0],
            [-0.0, 0.0, -1, -1, -1, -1, -1, -1],
        ]
        for c in cases:
            lg = np.array(c, dtype=np.float32)
            assert sample_logits(s, lg) == reference_sample(r, lg), c
        assert sample_logits(s, np.array(cases[0], dtype=np.float32)) == 1
    finally:
        s.close()
        r.close()


@pytest.mark.parametrize(
    "kw, fast",
    [
        (dict(temperature=0.0), True),
        (dict(temperature=0.0, penalty_last_n=-1, repeat_penalty=1.5), True),
        (dict(temperature=0.0, repeat_penalty=1.1), False),
        (dict(temperature=0.0, frequency_penalty=0.1), False),
        (dict(temperature=0.0, presence_penalty=0.1), False),
        (dict(temperature=0.0, logit_bias={3: 1.0}), False),
        (dict(temperature=0.0, ignore_eos=True), False),
        (dict(temperature=0.2), False),
        (dict(temperature=-1.0), False),
    ],
)
def test_the_fast_path_is_taken_only_for_a_plain_greedy_chain(monkeypatch, kw, fast):
    calls = []
    apply = llama_cpp.llama_sampler_apply
    monkeypatch.setattr(llama_cpp, "llama_sampler_apply", lambda *a: calls.append(1) or apply(*a))
    s = Sampler(vocab(), seed=3, **kw)
    try:
        assert s.greedy is fast
        for lg in logit_stream(2, steps=5):
            sample_logits(s, lg)
        assert len(calls) == (0 if fast else 5)
        # float64 logits would be compared in float64 by np.argmax: they go through the chain
        sample_logits(s, np.zeros(N_VOCAB))
        assert len(calls) == (1 if fast else 6)
    finally:
        s.close()


def test_threads_sample_on_their_own_arrays():
    """Each thread refills its own token-data array: concurrent chains do not see each other's logits."""
    out, want = {}, {}
    for i in range(4):
        ref = Sampler(vocab(), seed=20 + i, **CHAINS["full chain + penalties"])
        want[i] = [reference_sample(ref, lg) for lg in logit_stream(30 + i)]
        ref.close()

    def run(i):
        s = Sampler(vocab(), seed=20 + i, **CHAINS["full chain + penalties"])
        out[i] = [sample_logits(s, lg) for lg in logit_stream(30 + i)]
        s.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == want


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sampling") / "tiny.gguf"
    write_tiny_llama(path, tokenizer="bytes")
    return path


@pytest.mark.parametrize(
    "kw",
    [CHAINS[k] for k in ("greedy", "greedy + repeat penalty", "default chain", "full chain + penalties")]
    + [
        dict(temperature=0.0, grammar='root ::= "ab" [a-f]+'),
        dict(temperature=0.7, grammar="root ::= [0-9]+"),
    ],
    ids=["greedy", "greedy+penalty", "default", "full+penalties", "greedy+grammar", "sampled+grammar"],
)
def test_tokens_equal_llama_sampler_sample_on_a_context(byte_model, kw):
    """Llama's own path: llama_sampler_sample reads the context's output row; sample_logits gets the same row
    as an array (a grammar constrains both the same way)."""
    kw = dict(kw)
    with Session(byte_model, budget=64, n_threads=2) as s:
        if "grammar" in kw:
            kw["grammar"] = llama_cpp.LlamaGrammar.from_string(kw["grammar"], verbose=False)
        ours, llamas = Sampler(s, seed=5, **kw), Sampler(s, seed=5, **kw)
        try:
            assert ours.greedy == ("grammar" not in kw and kw == {"temperature": 0.0})
            s.eval(s.tokenize("ab", add_special=True, parse_special=True))
            got = []
            for _ in range(12):
                tok = sample_logits(ours, s.logits())
                assert tok == llamas.sample(s)
                got.append(tok)
                if s.is_eog(tok):
                    break
                s.eval([tok])
            if "grammar" in kw:
                text = s.detokenize(got[:-1] if s.is_eog(got[-1]) else got)
                assert re.fullmatch("ab[a-f]+" if kw["temperature"] == 0 else "[0-9]+", text), text
        finally:
            ours.close()
            llamas.close()


@pytest.mark.parametrize("n", [1, 64, 49152, 128256])
def test_log_normalizer_matches_float64(n):
    rng = np.random.default_rng(n)
    for scale in (0.1, 1.0, 3.0, 10.0, 30.0):
        for shift in (0.0, -20.0, 50.0, 1000.0):
            lg = (rng.standard_normal(n) * scale + shift).astype(np.float32)
            if n > 1:
                lg[rng.integers(0, n, 3)] = -np.inf
            want = float(np.logaddexp.reduce(lg.astype(np.float64)))
            assert abs(log_normalizer(lg) - want) <= LSE_TOL, (scale, shift)
    assert log_normalizer(np.full(4, -np.inf, np.float32)) == -math.inf
    assert log_normalizer(np.array([0, np.inf], np.float32)) == math.inf
    assert math.isnan(log_normalizer(np.array([0, np.nan], np.float32)))
