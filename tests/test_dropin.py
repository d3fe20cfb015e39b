"""tova_cpp.Llama as a drop-in for llama_cpp.Llama: one llama-cpp-python script, run against both classes on
SmolLM2 with greedy sampling and a cache that holds the whole text, gives the same tokens and text."""

from __future__ import annotations

import json
import subprocess
import sys

import llama_cpp
import pytest
from llama_cpp import LlamaGrammar

import tova_cpp

CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Name three colors."},
]
# both classes evaluate prompts in micro-batches of 512 with flash attention off: the same arithmetic
COMMON = dict(n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=2, flash_attn=False, seed=42, verbose=False)


def script(Llama, path) -> dict:
    """A representative llama-cpp-python script; only the class differs between the two runs.

    Each request starts with llm.reset(): llama-cpp-python otherwise re-evaluates only the part of a prompt
    after its longest common prefix with the last one (at least the last token alone), tova_cpp the whole
    prompt in one micro-batch; a different split changes the float sums (matrix-vector vs matrix-matrix
    kernels), enough to flip a near-tie under greedy sampling."""
    out = {}
    llm = Llama(str(path), **COMMON)
    real_call, real_chat = llm.__call__, llm.create_chat_completion

    def call(*args, **kw):
        llm.reset()
        return real_call(*args, **kw)

    def chat(*args, **kw):
        llm.reset()
        return real_chat(*args, **kw)

    out["n_ctx"], out["n_vocab"], out["n_embd"] = llm.n_ctx(), llm.n_vocab(), llm.n_embd()
    out["eos"], out["bos"] = llm.token_eos(), llm.token_bos()
    out["arch"] = llm.metadata["general.architecture"]
    toks = llm.tokenize(b"The quick brown fox jumps over the lazy dog.")
    out["tokens"] = toks
    out["detok"] = llm.detokenize(toks)
    c = call("The capital of France is", max_tokens=24, temperature=0.0, stop=["\n\n"], echo=True)
    out["completion"] = (
        c["choices"][0]["text"],
        c["choices"][0]["finish_reason"],
        c["usage"]["prompt_tokens"],
    )
    c = call(llm.tokenize(b"Once upon a time"), max_tokens=20, temperature=0.0)
    out["token_prompt"] = (c["choices"][0]["text"], c["usage"]["completion_tokens"])
    chunks = list(call("List the planets:", max_tokens=30, temperature=0.0, stream=True))
    out["stream_completion"] = (
        "".join(ch["choices"][0]["text"] for ch in chunks),
        chunks[-1]["choices"][0]["finish_reason"],
    )
    r = chat(CHAT, max_tokens=32, temperature=0.0)
    out["chat"] = (r["choices"][0]["message"]["content"], r["choices"][0]["finish_reason"], r["usage"])
    chunks = list(chat(CHAT, max_tokens=32, temperature=0.0, stream=True))
    out["stream_chat"] = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks)
    r = chat(
        [{"role": "user", "content": "Give a JSON object with a name and an age."}],
        response_format={"type": "json_object"},
        max_tokens=32,
        temperature=0.0,
    )
    out["json_mode"] = r["choices"][0]["message"]["content"]
    schema = {"type": "object", "properties": {"color": {"type": "string"}}, "required": ["color"]}
    r = chat(
        [{"role": "user", "content": "What color is the sky? Answer in JSON."}],
        response_format={"type": "json_object", "schema": schema},
        max_tokens=32,
        temperature=0.0,
    )
    out["json_schema"] = r["choices"][0]["message"]["content"]
    grammar = LlamaGrammar.from_string('root ::= ("yes" | "no") "."', verbose=False)
    c = call("Is the sky blue? Answer:", grammar=grammar, max_tokens=8, temperature=0.0)
    out["grammar"] = c["choices"][0]["text"]
    banned = llm.tokenize(b" Paris", add_bos=False)[0]
    c = call("The capital of France is", max_tokens=8, temperature=0.0, logit_bias={banned: -100.0})
    out["logit_bias"] = c["choices"][0]["text"]
    c = call(
        "Repeat after me: la la la la",
        max_tokens=24,
        temperature=0.0,
        frequency_penalty=0.8,
        presence_penalty=0.5,
        repeat_penalty=1.3,
    )
    out["penalties"] = c["choices"][0]["text"]
    # sampling with a seed: the same sampler chain and seed draw the same tokens
    c = call("Once upon a time", max_tokens=24, temperature=0.9, top_k=50, top_p=0.9, seed=7)
    out["sampled"] = c["choices"][0]["text"]
    c = call("Once upon a time", max_tokens=24, temperature=0.9, mirostat_mode=2, mirostat_tau=4.0, seed=7)
    out["mirostat"] = c["choices"][0]["text"]
    llm.close()
    return out


@pytest.fixture(scope="module")
def both(smollm2_path):
    ref = script(llama_cpp.Llama, smollm2_path)
    got = script(tova_cpp.Llama, smollm2_path)
    return ref, got


@pytest.mark.parametrize(
    "key",
    [
        "n_ctx",
        "n_vocab",
        "n_embd",
        "eos",
        "bos",
        "arch",
        "tokens",
        "detok",
        "completion",
        "token_prompt",
        "stream_completion",
        "stream_chat",
        "json_mode",
        "json_schema",
        "grammar",
        "logit_bias",
        "penalties",
        "sampled",
        "mirostat",
    ],
)
def test_same_results_as_llama_cpp_python(both, key):
    ref, got = both
    assert got[key] == ref[key]


def test_same_chat_and_whole_prompt_usage(both):
    ref, got = both
    (ref_text, ref_reason, ref_usage), (text, reason, usage) = ref["chat"], got["chat"]
    assert (text, reason) == (ref_text, ref_reason)
    for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert usage[k] == ref_usage[k]
    assert usage["prompt_tokens_evaluated"] <= usage["prompt_tokens"]


def test_the_outputs_mean_something(both):
    _, got = both
    assert got["completion"][0].startswith("The capital of France is") and got["completion"][0] != (
        "The capital of France is"
    )
    assert got["grammar"].strip() in ("yes.", "no.")
    json.loads(got["json_mode"])
    assert isinstance(json.loads(got["json_schema"])["color"], str)
    assert "Paris" not in got["logit_bias"].split()[0] if got["logit_bias"].split() else True


def test_tools_through_llama_cpp_python_handlers(smollm2_path):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    kw = dict(
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=32,
        temperature=0.0,
    )
    with tova_cpp.Llama(smollm2_path, n_ctx=512, n_threads=2) as llm:
        r = llm.create_chat_completion(**kw)
    call = r["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["name"] == "get_weather"
    assert isinstance(json.loads(call["function"]["arguments"])["city"], str)


def test_json_schema_response_format_is_honoured(smollm2_path):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    with tova_cpp.Llama(smollm2_path, n_ctx=512, n_threads=2) as llm:
        r = llm.create_chat_completion(
            [{"role": "user", "content": "Pick a number."}],
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
            max_tokens=24,
            temperature=0.0,
        )
    assert isinstance(json.loads(r["choices"][0]["message"]["content"])["n"], int)


def test_constructor_as_llama_cpp_python(smollm2_path):
    with tova_cpp.Llama(smollm2_path, n_ctx=64, type_k=8, type_v=1, flash_attn=True, n_threads=2) as llm:
        assert llm.n_ctx() == 64 == llm.budget and llm.type_k == "q8_0" and llm.type_v == "f16"
    with tova_cpp.Llama(smollm2_path, n_ctx=64, type_k="q8_0", flash_attn=True, n_threads=2) as llm:
        assert llm.type_k == "q8_0"
    with pytest.raises(ValueError, match="type_k=3"):
        tova_cpp.Llama(smollm2_path, type_k=3)


def test_unknown_argument_is_a_type_error_without_del_noise(smollm2_path, tmp_path):
    with pytest.raises(TypeError, match=r"tova_cpp\.Llama.*'n_ctxx'"):
        tova_cpp.Llama(smollm2_path, n_ctxx=2048)
    code = f"from tova_cpp import Llama\ntry:\n    Llama({str(smollm2_path)!r}, n_ctxx=1)\nexcept TypeError:\n    pass"
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_ignored_options_warn_once_by_name(smollm2_path):
    with pytest.warns(UserWarning, match=r"ignores.*\buse_mlock, vocab_only\b") as rec:
        llm = tova_cpp.Llama(smollm2_path, n_ctx=64, n_threads=2, use_mlock=True, vocab_only=True, main_gpu=0)
    llm.close()
    assert len(rec) == 1  # main_gpu=0 is llama-cpp-python's default: nothing to say
