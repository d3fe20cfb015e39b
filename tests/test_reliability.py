"""Hostile input on a Session: closed handles, bad token ids, huge sizes, models without a tokenizer, threads,
an exception in the middle of eval, symlinked benchmark outputs. Probes that used to abort the interpreter run
in a child process (with a memory limit), so a regression fails the test instead of killing pytest."""

from __future__ import annotations

import os
import random
import resource
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from tiny_gguf import SPECIALS, write_tiny_llama

from tova_cpp import Cancelled, Session, SessionBusyError

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory) -> Path:
    """A tiny llama with a byte-level SentencePiece vocabulary (tokenize/detokenize work)."""
    path = tmp_path_factory.mktemp("rel") / "tiny-bytes.gguf"
    write_tiny_llama(path, tokenizer="bytes")
    return path


@pytest.fixture(scope="module")
def ids_model(tmp_path_factory) -> Path:
    """A tiny llama with no tokenizer (tokenizer.ggml.model "none"): token ids only."""
    path = tmp_path_factory.mktemp("rel") / "tiny-ids.gguf"
    write_tiny_llama(path)
    return path


def run_child(code: str, mem_gib: int = 4, timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter limited to mem_gib of address space: an abort or a runaway
    allocation shows up as a non-zero exit code, not as a dead test runner or a swapped machine."""

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (mem_gib << 30, mem_gib << 30))

    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=limit,
        env={**os.environ, "PYTHONPATH": str(TESTS)},
    )


# -- 1. after close ------------------------------------------------------------------------------------------
CLOSED_CALLS = {
    "eval": lambda s: s.eval([5]),
    "logits": lambda s: s.logits(),
    "tokenize": lambda s: s.tokenize("hi"),
    "detokenize": lambda s: s.detokenize([5]),
    "chat_prompt": lambda s: s.chat_prompt([{"role": "user", "content": "hi"}]),
    "kv_row_bytes": lambda s: s.kv_row_bytes(),
    "pos_window": lambda s: s.pos_window(),
    "is_eog": lambda s: s.is_eog(4),
    "cell_positions": lambda s: s.cell_positions(),
    "kept_positions": lambda s: s.kept_positions(),
    "n_occupied": lambda s: s.n_occupied,
    "engine_stats": lambda s: s.engine_stats(),
    "set_force_graph_mover": lambda s: s.set_force_graph_mover(True),
}


@pytest.mark.parametrize("call", sorted(CLOSED_CALLS))
def test_closed_session_raises_a_typed_error(byte_model, call):
    code = f"""
    from tova_cpp import Session, SessionClosedError
    s = Session({str(byte_model)!r}, budget=8, chunk=4, n_threads=1)
    s.eval([5, 6, 7])
    s.close()
    s.close()  # twice is fine
    import test_reliability as t
    try:
        t.CLOSED_CALLS[{call!r}](s)
    except SessionClosedError as e:
        assert isinstance(e, RuntimeError)
        print("refused:", e)
    """
    r = run_child(code)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "refused: the session is closed" in r.stdout


# -- 2. token ids --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [[-1], [10**6], [261], [2**40]], ids=lambda b: str(b[0]))
def test_out_of_range_ids_are_refused_by_detokenize(byte_model, bad):
    code = f"""
    from tova_cpp import Session
    s = Session({str(byte_model)!r}, budget=8, chunk=4, n_threads=1)
    assert s.n_vocab == 261
    try:
        s.detokenize({bad!r})
    except ValueError as e:
        print("refused:", e)
    print(repr(s.detokenize([5 + ord("h"), 5 + ord("i")])))
    """
    r = run_child(code)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "refused: token ids must be" in r.stdout and "'hi'" in r.stdout


def test_is_eog_and_chat_prompt_never_pass_a_bad_id_to_llama_cpp(byte_model):
    code = f"""
    import llama_cpp
    from tova_cpp import Session
    s = Session({str(byte_model)!r}, budget=8, chunk=4, n_threads=1)
    for bad in (-1, 10**6):
        try:
            s.is_eog(bad)
        except ValueError as e:
            print("refused:", e)
    llama_cpp.llama_vocab_bos = lambda vocab: -1  # a vocabulary without BOS (Qwen's, for one)
    print(repr(s.chat_prompt([{{"role": "user", "content": "hi"}}])))
    """
    r = run_child(code)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("refused: token ids must be in") == 2
    assert "<|im_start|>user\\nhi<|im_end|>" in r.stdout


@pytest.mark.parametrize("bad", [[1.5], [2.0], ["3"], [True], [np.float32(3)], [3, "x"]], ids=repr)
def test_non_integer_ids_are_refused(byte_model, bad):
    with Session(byte_model, budget=8, chunk=4, n_threads=1) as s:
        s.eval([5, 6, 7])
        before = (s.n_past, s.logits())
        with pytest.raises(ValueError, match="token ids must be integers"):
            s.eval(bad)
        with pytest.raises(ValueError, match="token ids must be integers"):
            s.detokenize(bad)
        assert s.n_past == before[0]
        np.testing.assert_array_equal(s.logits(), before[1])
        s.eval(np.array([8], dtype=np.int32))  # numpy integers stay welcome


# -- 3. huge sizes -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"budget": 10**9}, "fits"),
        ({"budget": 10**8}, "fits"),
        ({"budget": 2**31}, "limit"),
        ({"budget": 64, "chunk": 10**9}, "fits"),
        ({"budget": 64, "evict_interval": 10**9}, "fits"),
        ({"budget": 64, "n_threads": 1000}, "n_threads"),
        ({"budget": 64, "n_threads": 0}, "n_threads"),
        ({"budget": 64, "n_ubatch": 0}, "n_ubatch"),
        ({"budget": 64, "n_ubatch": 2.5}, "n_ubatch"),
    ],
    ids=lambda v: str(v),
)
def test_huge_sizes_are_refused_before_allocating(ids_model, kwargs, match):
    code = f"""
    import resource
    from tova_cpp import Session
    try:
        Session({str(ids_model)!r}, **{kwargs!r})
    except ValueError as e:
        print("refused:", e)
    print("peak MiB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
    """
    r = run_child(code)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "refused:" in r.stdout and match in r.stdout, r.stdout
    assert int(r.stdout.split("peak MiB")[1]) < 1024  # nothing large was allocated


def test_huge_n_ubatch_is_clamped_to_the_context(ids_model):
    code = f"""
    from tova_cpp import Session
    with Session({str(ids_model)!r}, budget=16, chunk=8, n_ubatch=10**9, n_threads=1) as s:
        assert s.n_ubatch == s.memory == 24
        s.eval(list(range(40)))
        assert s.n_occupied == 16 and s.n_past == 40
    print("ok")
    """
    r = run_child(code)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_a_budget_that_fits_says_so_in_the_refusal(ids_model):
    code = f"""
    from tova_cpp import Session
    try:
        Session({str(ids_model)!r}, budget=10**9)
    except ValueError as e:
        print(e)
    """
    r = run_child(code)
    assert r.returncode == 0 and "fits" in r.stdout, r.stderr[-2000:]
    fits = int(r.stdout.rsplit("at most about ", 1)[1].split()[0])
    assert fits > 10**5  # the tiny model's cells are ~10 KB with its attention: many fit in any test machine


def test_cli_refuses_a_huge_budget_with_one_error_line(byte_model):
    code = f"""
    import sys
    from tova_cpp.cli import main
    sys.exit(main(["generate", "-m", {str(byte_model)!r}, "--budget", "100000000", "-n", "2", "hello"]))
    """
    r = run_child(code)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "budget" in lines[0], r.stderr


# -- 5, 6. tokenizer -----------------------------------------------------------------------------------------
def test_model_without_tokenizer_refuses_text_and_takes_ids(ids_model):
    code = f"""
    from tova_cpp import Session, TokenizerError
    s = Session({str(ids_model)!r}, budget=8, chunk=4, n_threads=1)
    for call in (lambda: s.tokenize("hello"), lambda: s.detokenize([3, 4])):
        try:
            call()
        except TokenizerError as e:
            assert isinstance(e, ValueError)
            print("refused:", e)
    s.eval([3, 4, 5, 6, 7, 8, 9, 10, 11])
    print("ids ok", s.n_past, s.n_occupied)
    """
    r = run_child(code)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("refused: the model has no tokenizer") == 2
    assert "ids ok 9 8" in r.stdout


@pytest.mark.parametrize(
    "text", ["a " * 10, "a" * 40, "\u00e9" * 30, "x\ny " * 50], ids=["spaces", "a", "e", "xy"]
)
def test_tokenize_retries_when_the_text_needs_more_tokens_than_its_guess(byte_model, text):
    with Session(byte_model, budget=8, chunk=4, n_threads=1) as s:
        tokens = s.tokenize(text)
        assert len(tokens) > len(text.encode()) + 1  # more than one token per byte (the word-start marker)
        # this vocabulary has no "▁" token: the word-start marker comes back as its three bytes
        assert s.detokenize(tokens).replace("\u2581", " ").strip() == text.strip()


# -- 8. threads ----------------------------------------------------------------------------------------------
def test_one_session_from_two_threads_is_refused_not_corrupted(ids_model):
    with Session(ids_model, budget=16, chunk=8, n_threads=1) as s:
        errors, done = [], threading.Event()

        def hammer():
            while not done.is_set():
                try:
                    s.eval([7])
                except SessionBusyError as e:
                    errors.append(e)

        t = threading.Thread(target=hammer)
        t.start()
        busy = 0
        try:
            for _ in range(300):
                try:
                    s.eval([9])
                    s.logits()
                except SessionBusyError:
                    busy += 1
        finally:
            done.set()
            t.join()
        assert busy + len(errors) > 0  # the two threads did collide
        assert all("in use by another thread" in str(e) for e in errors)
        lo, hi = s.pos_window()
        assert hi == s.n_past - 1 and lo == s.n_past - s.n_occupied and s.n_occupied <= 16
        for row in s.kept_positions():
            row = row[row >= 0]
            assert row.size == s.n_occupied and np.unique(row).size == row.size


def greedy(path, prompt, steps, **kw):
    with Session(path, n_threads=1, **kw) as s:
        s.eval(prompt)
        out = []
        for _ in range(steps):
            out.append(int(np.argmax(s.logits())))
            s.eval([out[-1]])
        return out, s.kept_positions()


def test_two_sessions_on_two_threads_stay_independent(ids_model, byte_model):
    jobs = [
        (ids_model, list(range(3, 40)), {"budget": 16, "chunk": 8, "policy": "tova"}),
        (byte_model, list(range(20, 70)), {"budget": 12, "chunk": 4, "policy": "h2o"}),
    ]
    want = [greedy(p, prompt, 60, **kw) for p, prompt, kw in jobs]
    for _ in range(2):
        got = [None, None]

        def run(i, got=got):
            p, prompt, kw = jobs[i]
            got[i] = greedy(p, prompt, 60, **kw)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for (tokens, kept), (want_tokens, want_kept) in zip(got, want, strict=True):
            assert tokens == want_tokens
            np.testing.assert_array_equal(kept, want_kept)


# -- 4. an exception in the middle of eval -------------------------------------------------------------------
def test_keyboard_interrupt_mid_eval_leaves_a_consistent_session(ids_model):
    """SIGINT at random moments of a long chunked eval (a progress callback lets Python run between
    micro-batches, as the CLI's does): the interrupted session must agree with llama.cpp (n_past ==
    seq_pos_max + 1, the metadata window == the engine's cells), keep exactly the tokens it evaluated, and
    continue as a session cancelled cleanly at the same token does."""
    rng = random.Random(0)
    prompt = [3 + i % 60 for i in range(800)]

    def tick(done, total):
        return None

    with (
        Session(ids_model, budget=16, chunk=4, n_threads=1) as s,
        Session(ids_model, budget=16, chunk=4, n_threads=1) as ref,
    ):
        durations = []
        for _ in range(3):  # the fastest run: timers must fire inside the eval, not after it
            s.reset()
            t0 = time.perf_counter()
            s.eval(prompt, progress=tick)
            durations.append(time.perf_counter() - t0)
        duration = min(durations)
        s.reset()
        interrupted = 0
        old = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            for _ in range(200):
                if interrupted == 30:
                    break
                signal.signal(signal.SIGALRM, lambda *a: os.kill(os.getpid(), signal.SIGINT))
                signal.setitimer(signal.ITIMER_REAL, rng.uniform(0.02, 0.7) * duration)
                try:
                    s.eval(prompt, progress=tick)
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    s.reset()  # the timer came too late: nothing to check
                    continue
                except KeyboardInterrupt:
                    interrupted += 1
                lo, hi = s.pos_window()
                assert s.n_past == hi + 1  # llama.cpp's positions and ours agree
                if s.n_occupied:
                    assert (lo, hi) == (s.n_past - s.n_occupied, s.n_past - 1)
                else:
                    assert (lo, hi) == (-1, -1)
                assert (s.cell_positions() >= 0).sum() == s.n_occupied * s.n_layer
                n = s.n_past
                if 0 < n < len(prompt):  # the same cut made cleanly: a progress callback that says stop
                    ref.reset()
                    with pytest.raises(Cancelled):
                        ref.eval(prompt, progress=lambda done, total, n=n: done < n)
                    assert ref.n_past == n
                    s.eval([5, 6, 7])  # the next eval works and computes what the cleanly cut session does
                    ref.eval([5, 6, 7])
                    np.testing.assert_array_equal(s.logits(), ref.logits())
                    np.testing.assert_array_equal(s.cell_positions(), ref.cell_positions())
                s.reset()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGINT, old)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
        assert interrupted == 30


# -- 7. benchmark outputs ------------------------------------------------------------------------------------
def test_bench_outputs_replace_a_planted_symlink_instead_of_following_it(tmp_path):
    from tova_cpp.bench import common

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    for name in ("ppl.csv", "ppl.json", "ppl.png"):
        (out / name).symlink_to(victim)
    common.write_csv(out / "ppl.csv", [{"a": 1}], ["a"])
    assert victim.read_text() == "precious\n"
    common.write_json(out / "ppl.json", {"command": "x"}, [{"a": 1}])
    plt = common.pyplot()
    fig = plt.figure()
    common.save_figure(fig, out / "ppl.png", dpi=20)
    plt.close(fig)
    assert victim.read_text() == "precious\n"
    for name in ("ppl.csv", "ppl.json", "ppl.png"):
        assert not (out / name).is_symlink() and (out / name).stat().st_size > 0
    assert (out / "ppl.csv").read_text().splitlines() == ["a", "1"]
    assert (out / "ppl.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in out.iterdir()) == ["ppl.csv", "ppl.json", "ppl.png"]  # no temporary left


def test_more_logprobs_than_the_vocabulary_returns_all_of_it(byte_model):
    """logprobs=10**9 raised numpy's "kth out of bounds"; llama-cpp-python returns every token's."""
    from tova_cpp import Llama

    with Llama(str(byte_model), n_ctx=16, n_threads=1, verbose=False) as llm:
        out = llm("ab", max_tokens=2, logprobs=10**9, temperature=0.0)
        top = out["choices"][0]["logprobs"]["top_logprobs"]
        # keyed by piece text, as llama-cpp-python: the invalid single bytes all read "\ufffd"
        assert len(top) == 2 and all(128 < len(t) <= len(SPECIALS) + 256 for t in top)


@pytest.mark.parametrize("role", [5, None, b"user"])
def test_a_message_role_that_is_not_a_str_is_refused_clearly(byte_model, role):
    """It reached the chat template and came back as jinja's "can only concatenate str" TypeError."""
    from tova_cpp import Llama

    with Llama(str(byte_model), n_ctx=16, n_threads=1, verbose=False) as llm:
        with pytest.raises(ValueError, match="str 'role'"):
            llm.create_chat_completion([{"role": role, "content": "hi"}], max_tokens=1)
