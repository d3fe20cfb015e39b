"""The `tova` command through subprocess: generate, chat, exit codes, timings and error lines."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
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
    assert r.returncode == 1 and r.stderr.startswith("error: llama.cpp could not load")
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
    ],
)
def test_invalid_flag_values_get_argparse_messages(argv, tmp_path):
    r = tova("generate", "-p", "hi", *argv, cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    assert "usage: tova generate" in r.stderr and "error: argument" in r.stderr
