"""The `tova` command through subprocess: generate, chat, exit codes, timings and error lines."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

TIMINGS = ("prompt eval time =", "eval time =", "cells used / budget =", "MiB allocated")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    from tiny_gguf import write_tiny_llama

    path = tmp_path_factory.mktemp("tiny") / "tiny-bytes.gguf"
    write_tiny_llama(path, tokenizer="bytes", n_layer=2)
    return path


def tova(*argv, cwd, timeout=300, stdin=None):
    # cwd outside the checkout: the installed package and console script are what is tested
    return subprocess.run(
        [sys.executable, "-m", "tova_cpp", *map(str, argv)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        input=stdin,
    )


def test_generate_prints_text_and_timings(smollm2_path, tmp_path):
    r = tova(
        "generate",
        "-p",
        "Name three colors.",
        "-n",
        "24",
        "--budget",
        "16",
        "--chunk",
        "8",
        "--temp",
        "0",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    for key in TIMINGS:
        assert key in r.stderr
    assert "cells used / budget = 16 / 16" in r.stderr


def test_generate_with_sink_and_keep(smollm2_path, tmp_path):
    r = tova(
        "generate",
        "-p",
        "Name three colors.",
        "-n",
        "24",
        "--budget",
        "16",
        "--chunk",
        "8",
        "--policy",
        "sink",
        "--n-sink",
        "2",
        "--keep",
        "6",
        "--temp",
        "0",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert "cells used / budget = 16 / 16 (policy sink)" in r.stderr


def test_the_main_job_spelling_and_the_console_script(smollm2_path, tmp_path):
    # `python -m tova_cpp "prompt"` (README) and the installed `tova` script give the same greedy text
    a = tova("Say hi.", "-n", "8", "--temp", "0", "--budget", "32", cwd=tmp_path)
    script = shutil.which("tova", path=os.path.dirname(sys.executable))
    assert script, "the tova console script is not installed beside this Python"
    b = subprocess.run(
        [script, "generate", "Say hi.", "-n", "8", "--temp", "0", "--budget", "32"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert a.returncode == b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout and a.stdout.strip()


def test_generate_until_end_of_generation(smollm2_path, tmp_path):
    r = tova(
        "generate",
        "-p",
        "What is the capital of France? Answer in one sentence.",
        "-n",
        "-1",
        "--temp",
        "0",
        "--budget",
        "256",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_generate_from_file_with_sampling_flags(tiny_path, tmp_path):
    f = tmp_path / "prompt.txt"
    f.write_text("héllo wörld", encoding="utf-8")
    argv = [
        "generate",
        "-m",
        tiny_path,
        "-f",
        f,
        "--raw",
        "-n",
        "20",
        "-s",
        "5",
        "--temp",
        "0.9",
        "--top-k",
        "20",
        "--top-p",
        "0.9",
        "--min-p",
        "0.01",
        "--repeat-penalty",
        "1.1",
        "-t",
        "2",
        "--budget",
        "8",
        "--chunk",
        "4",
        "-ctk",
        "q8_0",
        "-fa",
        "off",
        "-ngl",
        "0",
    ]
    a, b = tova(*argv, cwd=tmp_path), tova(*argv, cwd=tmp_path)
    assert a.returncode == 0, a.stderr
    assert a.stdout.startswith("héllo wörld") and a.stdout == b.stdout  # -s: reproducible
    assert "cells used / budget = 8 / 8" in a.stderr


def test_ctrl_c_stops_an_endless_generation(tiny_path, tmp_path):
    # the tiny fixture never samples end-of-generation: -n -1 runs until interrupted, in constant memory
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tova_cpp",
            "generate",
            "-m",
            str(tiny_path),
            "-p",
            "abc",
            "--raw",
            "-n",
            "-1",
            "--budget",
            "8",
            "--chunk",
            "4",
            "--temp",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    time.sleep(8)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert "cells used / budget = 8 / 8" in err.decode()
    n_eval = int(err.decode().split("eval time =")[-1].split("/")[1].split("tokens")[0])
    assert n_eval > 8 + 4  # ran past budget + chunk


def test_chat_streams_resets_and_exits_on_eof(smollm2_path, tmp_path):
    r = tova(
        "chat",
        "--budget",
        "64",
        "-n",
        "12",
        "--temp",
        "0",
        cwd=tmp_path,
        stdin="Hello!\nWhat did I just say?\n/reset\nHello!\n",
    )
    assert r.returncode == 0, r.stderr
    assert "(conversation reset)" in r.stderr
    assert r.stderr.count("prompt eval time") == 3
    answers = [line for line in r.stdout.split("> ") if line.strip()]
    assert len(answers) == 3
    assert answers[0] == answers[2]  # after /reset the same question gets the same greedy answer


def test_chat_ctrl_c_stops_the_answer_not_the_chat(tiny_path, tmp_path):
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tova_cpp",
            "chat",
            "-m",
            str(tiny_path),
            "-n",
            "-1",
            "--budget",
            "8",
            "--chunk",
            "4",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    p.stdin.write(b"hi\n")
    p.stdin.flush()
    time.sleep(8)
    p.send_signal(signal.SIGINT)  # the tiny fixture never ends an answer on its own
    time.sleep(2)
    out, err = p.communicate(b"/reset\n", timeout=120)
    assert p.returncode == 0, err
    assert b" [stopped]" in out
    assert b"(conversation reset)" in err and b"prompt eval time" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "-p", "   "], "error: the prompt is empty"),
        (["generate", "-p", "hi", "-m", "/nonexistent.gguf"], "error: model file not found"),
        (["generate", "-f", "/nonexistent-prompt.txt"], "error: cannot read prompt file"),
        (["generate"], "error: give exactly one prompt"),
        (["generate", "-p", "hi", "--budget", "8", "--keep", "8"], "error: keep must be"),
    ],
)
def test_errors_are_one_line_exit_1(argv, message, tmp_path):
    r = tova(*argv, cwd=tmp_path, timeout=120)
    assert r.returncode == 1
    assert r.stderr.startswith(message) and r.stderr.count("\n") == 1, r.stderr


def test_non_utf8_prompt_file(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\xe9".encode("latin-1"))
    r = tova("generate", "-f", f, cwd=tmp_path, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("error: prompt file") and "not UTF-8" in r.stderr


def test_model_that_fails_to_load(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    r = tova("generate", "-p", "hi", "-m", bad, cwd=tmp_path, timeout=120)
    # llama.cpp's own error lines say why (they print without --verbose: session.py's log callback), then ours
    *why, last = r.stderr.splitlines()
    assert r.returncode == 1 and last.startswith("error: llama.cpp could not load")
    assert why and all("gguf" in w or "llama_model_load" in w for w in why), why
    assert "Traceback" not in r.stderr
    r = tova("generate", "-p", "hi", "-m", bad, "--verbose", cwd=tmp_path, timeout=120)
    assert r.returncode == 1 and "Traceback" in r.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["--temp", "hot"],
        ["-fa", "maybe"],
        ["--budget", "0"],
        ["-n", "-2"],
        ["--policy", "lru"],
        ["-ctk", "q9"],
        ["--top-p", "1.5"],
        ["--temp", "nan"],
        ["--temp", "inf"],
    ],
)
def test_invalid_flag_values_get_argparse_messages(argv, tmp_path):
    r = tova("generate", "-p", "hi", *argv, cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    assert "usage: tova generate" in r.stderr and "error: argument" in r.stderr


def test_llama_cpp_and_mlx_lm_flag_spellings(tiny_path, tmp_path):
    base = ["generate", "-m", tiny_path, "--raw", "--temp", "0", "-t", "2"]
    a = tova(*base, "-p", "abc", "-c", "8", "--chunk", "4", "-b", "8", "-ub", "8", "-n", "20", cwd=tmp_path)
    b = tova(*base, "-p", "abc", "--max-kv-size", "8", "--chunk", "4", "--max-tokens", "20", cwd=tmp_path)
    c = tova(
        *base, "-f", "-", "--ctx-size", "8", "--chunk", "4", "--n-predict", "20", cwd=tmp_path, stdin="abc"
    )
    for r in (a, b, c):
        assert r.returncode == 0, r.stderr
        assert "cells used / budget = 8 / 8" in r.stderr
    assert a.stdout == b.stdout == c.stdout
    # -r stops at a text the model generates; -sys is the system prompt, not -s ys
    stop = a.stdout[6:8]
    r = tova(*base, "-p", "abc", "-c", "8", "--chunk", "4", "-n", "20", "-r", stop, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.rstrip("\n") == a.stdout[: a.stdout.index(stop, 3)]
    r = tova("generate", "-m", tiny_path, "-p", "abc", "-sys", "be brief", "-n", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_grammar_flags(tiny_path, tmp_path):
    gbnf = tmp_path / "ab.gbnf"
    gbnf.write_text('root ::= "ab" [ab]+\n')
    for flag in (["--grammar", 'root ::= "ab" [ab]+'], ["--grammar-file", gbnf]):
        r = tova("generate", "-m", tiny_path, "-p", "xyz", "--raw", "-n", "10", *flag, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        out = r.stdout.rstrip("\n")[3:]
        assert out.startswith("ab") and set(out) <= {"a", "b"}, out
    r = tova("generate", "-m", tiny_path, "-p", "xyz", "--grammar", "root ::= (", cwd=tmp_path)
    assert r.returncode == 1 and "error: llama.cpp could not parse the grammar" in r.stderr


def test_version_and_unsupported_llama_cpp_flags(tmp_path):
    from tova_cpp import __version__

    r = tova("--version", cwd=tmp_path, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"tova_cpp {__version__}"
    for argv in (["-hf", "org/model"], ["generate", "-p", "hi", "--lora", "x.gguf"], ["--mmproj=x.gguf"]):
        r = tova(*argv, cwd=tmp_path, timeout=60)
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith("error: llama.cpp's -") and r.stderr.count("\n") == 1, r.stderr
    r = tova("generate", "-p", "hi", "--bud", "8", cwd=tmp_path, timeout=60)  # no abbreviations
    assert r.returncode == 2 and "unrecognized arguments: --bud" in r.stderr


def test_nan_model_is_one_error_line(tiny_path, tmp_path):
    from test_api import nan_model

    bad = nan_model(tiny_path, tmp_path / "nan.gguf")
    r = tova("generate", "-m", bad, "-p", "abc", "--raw", "-n", "4", cwd=tmp_path)
    assert r.returncode == 1 and "error: the model produced" in r.stderr and "Traceback" not in r.stderr


def test_unsafe_chat_template_is_one_error_line(tmp_path, monkeypatch):
    import tiny_gguf

    monkeypatch.setattr(tiny_gguf, "CHATML", "{{ ''.__class__.__mro__ }}")
    path = tmp_path / "evil.gguf"
    tiny_gguf.write_tiny_llama(path, tokenizer="bytes", n_layer=1)
    r = tova("generate", "-m", path, "-p", "abc", "-n", "2", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.startswith("error: the chat template was refused"), r.stderr
    assert r.stderr.count("\n") == 1


def test_chat_keeps_a_readline_history(tiny_path, tmp_path):
    pytest.importorskip("readline")
    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "state"))
    master, slave = os.openpty()  # readline edits lines on a terminal only
    p = subprocess.Popen(
        [sys.executable, "-m", "tova_cpp", "chat", "-m", str(tiny_path), "-n", "3", "--budget", "16"],
        stdin=slave,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env=env,
    )
    os.close(slave)
    try:
        os.write(master, b"first line\r")
        time.sleep(5)
        os.write(master, b"\x04")
        out, err = p.communicate(timeout=120)
    finally:
        os.close(master)
    assert p.returncode == 0, err
    assert "first line" in (tmp_path / "state" / "tova_cpp" / "chat_history").read_text()


def test_ctrl_c_stops_a_long_prompt_promptly(smollm2_path, tmp_path):
    # about 6,000 tokens: tens of seconds to evaluate on a 2-core machine; Ctrl-C lands between ubatches
    prompt = tmp_path / "long.txt"
    prompt.write_text("The quick brown fox jumps over the lazy dog. " * 600)
    p = subprocess.Popen(
        [sys.executable, "-m", "tova_cpp", "generate", "-m", str(smollm2_path), "-f", str(prompt), "--raw"]
        + ["-c", "8192", "-ub", "64", "--chunk", "64", "-t", "2", "-n", "4"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    # wait for the progress bar (it shows once the prompt has run 2 s; loading may take long on a busy machine)
    seen = bytearray()

    def pump() -> None:
        for chunk in iter(lambda: os.read(p.stderr.fileno(), 4096), b""):
            seen.extend(chunk)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while b"tok" not in seen and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert p.poll() is None, "the prompt finished before Ctrl-C: make it longer"
    assert b"prompt" in seen and b"tok" in seen, seen  # the progress bar
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    p.wait(timeout=120)
    waited = time.monotonic() - t0
    reader.join(timeout=10)
    p.stdout.close(), p.stderr.close()
    err = bytes(seen)
    assert p.returncode == 130, err
    assert "prompt evaluation cancelled" in err.decode()
    assert waited < 10, waited
