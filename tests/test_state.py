"""Save and resume a bounded conversation: exact continuation after a load, typed refusals that change nothing."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import tova_cpp
from tova_cpp import Session, StateError
from tova_cpp.state import parse_engine_state, read_file

PROMPT = "The lighthouse keeper climbed the stairs every evening, counting the steps as he went. "


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    from tiny_gguf import write_tiny_llama

    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_tiny_llama(path)
    return path


def greedy(s: Session, n: int) -> list[np.ndarray]:
    """n greedy steps; the logits after each."""
    out = []
    for _ in range(n):
        s.eval([int(np.argmax(s.logits()))])
        out.append(s.logits())
    return out


def snapshot(s: Session):
    st = s.save_state()
    return st.n_tokens, st.llama_state, st.engine_state, s.logits().tobytes() if s.n_past else b""


def tiny_kwargs(policy: str) -> dict:
    return {"budget": 8, "chunk": 4, "policy": policy, "n_threads": 2}


def tiny_prompt(policy: str) -> list[int]:
    rng = np.random.default_rng(1)
    return [int(t) for t in rng.integers(3, 60, 6 if policy == "full" else 14)]


@pytest.mark.parametrize("policy", sorted(tova_cpp.POLICIES))
@pytest.mark.parametrize("via_file", [False, True])
def test_continuation_after_load_is_bit_identical(tiny_path, tmp_path, policy, via_file):
    steps = 3 if policy == "full" else 6
    with Session(tiny_path, **tiny_kwargs(policy)) as a:
        a.eval(tiny_prompt(policy))
        greedy(a, 2)  # a decode or two after the prompt's cuts
        state = a.save_state()
        if via_file:
            a.save(tmp_path / "s.tova")
        n_past, kept = a.n_past, a.kept_positions()
        ref = greedy(a, steps)
        ref_kept = a.kept_positions()
    with Session(tiny_path, **tiny_kwargs(policy)) as b:
        b.eval([5, 6, 7])  # a different conversation in the target: replaced by the load
        if via_file:
            b.load(tmp_path / "s.tova")
        else:
            b.load_state(state)
        assert b.n_past == n_past
        np.testing.assert_array_equal(b.kept_positions(), kept)
        np.testing.assert_array_equal(b.logits(), state.scores[0])
        got = greedy(b, steps)
        for x, y in zip(ref, got, strict=True):
            np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(b.kept_positions(), ref_kept)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"policy": "tova", "evict_interval": 2, "flash_attn": True},
        {"policy": "h2o", "type_k": "q8_0"},
        {"policy": "sink", "keep": 2},
    ],
)
def test_smollm2_continuation_after_chunked_prompt_is_bit_identical(smollm2_path, kwargs):
    kw = {"budget": 32, "chunk": 16, "n_threads": 2, **kwargs}
    with Session(smollm2_path, **kw) as a:
        a.eval(a.tokenize(PROMPT * 3))  # > budget + chunk: several chunk cuts
        greedy(a, 3)
        state = a.save_state()
        cells = parse_engine_state(state.engine_state).cells
        assert cells[-1] + 1 > cells.size  # the saved cells have gaps: the load must keep them in place
        ref = greedy(a, 8)
    with Session(smollm2_path, **kw) as b:
        b.load_state(state)
        for x, y in zip(ref, greedy(b, 8), strict=True):
            np.testing.assert_array_equal(x, y)


def test_continuation_in_a_new_process_is_bit_identical(smollm2_path, tmp_path):
    child = textwrap.dedent(
        f"""
        import numpy as np
        from tova_cpp import Session
        with Session({str(smollm2_path)!r}, budget=24, chunk=16, policy="tova", n_threads=2) as s:
            s.eval(s.tokenize({PROMPT * 2!r}))
            for _ in range(4):
                s.eval([int(np.argmax(s.logits()))])
            s.save({str(tmp_path / "s.tova")!r})
            ref = []
            for _ in range(8):
                s.eval([int(np.argmax(s.logits()))])
                ref.append(s.logits())
            np.save({str(tmp_path / "ref.npy")!r}, np.stack(ref))
        """
    )
    subprocess.run([sys.executable, "-c", child], check=True)
    with Session(smollm2_path, budget=24, chunk=16, policy="tova", n_threads=2) as s:
        s.load(tmp_path / "s.tova")
        np.testing.assert_array_equal(np.stack(greedy(s, 8)), np.load(tmp_path / "ref.npy"))


def test_file_size_is_set_by_the_budget_not_the_length(tiny_path, tmp_path):
    sizes = []
    with Session(tiny_path, **tiny_kwargs("tova")) as s:
        for n in (10, 30):
            s.eval(list(range(3, 3 + n)))
            sizes.append(s.save(tmp_path / f"{n}.tova"))
            assert s.n_occupied == 8
    assert sizes[0] == sizes[1]


@pytest.mark.parametrize(
    "other, match",
    [
        ({"budget": 9}, "budget=8 .here: 9"),
        ({"policy": "window"}, "policy='tova'"),
        ({"type_k": "q8_0"}, "type_k"),
        ({"chunk": 5}, "chunk"),
        ({"evict_interval": 2}, "evict_interval"),
        ({"keep": 1}, "keep"),
    ],
)
def test_other_settings_are_refused_and_change_nothing(tiny_path, tmp_path, other, match):
    with Session(tiny_path, **tiny_kwargs("tova")) as a:
        a.eval(tiny_prompt("tova"))
        a.save(tmp_path / "s.tova")
    with Session(tiny_path, **{**tiny_kwargs("tova"), **other}) as b:
        b.eval([3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
        before = snapshot(b)
        with pytest.raises(StateError, match=match):
            b.load(tmp_path / "s.tova")
        assert snapshot(b) == before


def test_another_model_is_refused(tiny_path, tmp_path):
    from tiny_gguf import write_tiny_llama

    other = tmp_path / "other.gguf"
    write_tiny_llama(other, seed=1)  # same shape and metadata, other weights
    with Session(tiny_path, **tiny_kwargs("tova")) as a:
        a.eval(tiny_prompt("tova"))
        a.save(tmp_path / "s.tova")
    with Session(other, **tiny_kwargs("tova")) as b:
        b.eval([3, 4, 5])
        before = snapshot(b)
        with pytest.raises(StateError, match="another model"):
            b.load(tmp_path / "s.tova")
        assert snapshot(b) == before


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "magic", "garbage"])
def test_damaged_files_are_refused_and_change_nothing(tiny_path, tmp_path, damage):
    path = tmp_path / "s.tova"
    with Session(tiny_path, **tiny_kwargs("h2o")) as a:
        a.eval(tiny_prompt("h2o"))
        a.save(path)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[len(data) // 2] ^= 0x40
    elif damage == "empty":
        data = b""
    elif damage == "magic":
        data[:8] = b"GGUF\0\0\0\0"
    else:
        data = bytes(range(256)) * 4
    path.write_bytes(bytes(data))
    with Session(tiny_path, **tiny_kwargs("h2o")) as b:
        b.eval(tiny_prompt("h2o")[:5])
        before = snapshot(b)
        with pytest.raises(StateError, match="truncated|corrupted|not a tova_cpp session"):
            b.load(path)
        assert snapshot(b) == before
        greedy(b, 2)  # still usable


def test_a_failing_llama_cpp_load_rolls_back(tiny_path, monkeypatch):
    import llama_cpp

    with Session(tiny_path, **tiny_kwargs("tova")) as a:
        a.eval(tiny_prompt("tova"))
        state = a.save_state()
    with Session(tiny_path, **tiny_kwargs("tova")) as b:
        b.eval([9, 8, 7, 6, 5, 4, 3, 9, 8, 7])
        before = snapshot(b)
        real = llama_cpp.llama_state_seq_set_data
        calls = []

        def fail_once(*args):
            calls.append(1)
            return 0 if len(calls) == 1 else real(*args)

        monkeypatch.setattr(llama_cpp, "llama_state_seq_set_data", fail_once)
        with pytest.raises(StateError, match="refused"):
            b.load_state(state)
        assert len(calls) == 2  # the rollback loaded the previous conversation back
        assert snapshot(b) == before
        ref = greedy(b, 3)
    with Session(tiny_path, **tiny_kwargs("tova")) as c:
        c.eval([9, 8, 7, 6, 5, 4, 3, 9, 8, 7])
        for x, y in zip(ref, greedy(c, 3), strict=True):
            np.testing.assert_array_equal(x, y)


def test_empty_state_round_trips(tiny_path, tmp_path):
    with Session(tiny_path, **tiny_kwargs("tova")) as a:
        a.save(tmp_path / "s.tova")
        assert read_file(tmp_path / "s.tova").n_tokens == 0
        a.eval([3, 4, 5])
        a.load(tmp_path / "s.tova")
        assert (a.n_past, a.n_occupied, a.pos_window()) == (0, 0, (-1, -1))
        a.eval([3, 4, 5])
        assert a.n_past == 3


# -- Llama: a chat resumed from a file goes on as the uninterrupted one -------------------------------------
@pytest.fixture(scope="module")
def bytes_path(tmp_path_factory):
    from tiny_gguf import write_tiny_llama

    path = tmp_path_factory.mktemp("tiny") / "tiny-bytes.gguf"
    write_tiny_llama(path, tokenizer="bytes", n_layer=2)
    return path


CHAT = [{"role": "user", "content": "Tell me about lighthouses."}]


def test_llama_resumes_a_chat_from_a_file(bytes_path, tmp_path):
    from tova_cpp import Llama

    kw = {"model_path": bytes_path, "budget": 16, "chunk": 8, "n_threads": 2, "seed": 5}
    with Llama(**kw) as a:
        first = a.create_chat_completion(CHAT, max_tokens=12, temperature=0.0)
        a.save(tmp_path / "chat.tova")
        convo = CHAT + [first["choices"][0]["message"], {"role": "user", "content": "More?"}]
        # sampled, not greedy: the same reply needs the running seed restored too
        ref = a.create_chat_completion(convo, max_tokens=12, temperature=0.8, logprobs=True)
    with Llama(**{**kw, "seed": 9}) as b:
        b.load(tmp_path / "chat.tova")
        got = b.create_chat_completion(convo, max_tokens=12, temperature=0.8, logprobs=True)
        n_convo = len(b.tokenize(b.chat_prompt(convo)[0], special=True))
    assert got["choices"][0]["message"] == ref["choices"][0]["message"]
    assert got["choices"][0]["logprobs"] == ref["choices"][0]["logprobs"]
    # only the new turn was evaluated, as in the uninterrupted run
    assert got["usage"] == ref["usage"]
    assert got["usage"]["prompt_tokens_evaluated"] < n_convo // 2


# -- the CLI's --session FILE -----------------------------------------------------------------------------
def tova(*argv, cwd, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "tova_cpp", *map(str, argv)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
        input=stdin,
    )


def prompt_tokens(stderr: str) -> int:
    line = next(x for x in stderr.splitlines() if "prompt eval time" in x)
    return int(line.split("/")[1].split("tokens")[0])


CACHE_FLAGS = ("--budget", "16", "--chunk", "8", "--temp", "0", "-t", "2")


def test_cli_chat_session_resumes_where_the_last_run_stopped(bytes_path, tmp_path):
    flags = ("chat", "-m", bytes_path, "-n", "6", *CACHE_FLAGS)
    whole = tova(*flags, cwd=tmp_path, stdin="hi\nmore?\n")
    assert whole.returncode == 0, whole.stderr
    first = tova(*flags, "--session", "s.tova", cwd=tmp_path, stdin="hi\n")
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "s.tova").is_file()
    second = tova(*flags, "--session", "s.tova", cwd=tmp_path, stdin="more?\n")
    assert second.returncode == 0, second.stderr
    answers = [x for x in whole.stdout.split("> ") if x.strip()]
    assert [x for x in first.stdout.split("> ") if x.strip()] == answers[:1]
    assert [x for x in second.stdout.split("> ") if x.strip()] == answers[1:]
    # the resumed run evaluated only its own turn, as the uninterrupted one did
    assert prompt_tokens(second.stderr) == prompt_tokens(whole.stderr.split("tova: cells")[1])
    assert prompt_tokens(second.stderr) < prompt_tokens(first.stderr) + 12


def test_cli_generate_session_resumes_and_updates(bytes_path, tmp_path):
    flags = ("generate", "-m", bytes_path, "-n", "6", *CACHE_FLAGS, "--session", "g.tova")
    one = tova(*flags, "-p", "hi", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    kv = len(read_file(tmp_path / "g.tova").llama_state)
    two = tova(*flags, "-p", "more?", cwd=tmp_path)
    assert two.returncode == 0, two.stderr
    saved = read_file(tmp_path / "g.tova")
    assert len(saved.llama_state) == kv  # the cache part is set by the budget; only the text grows
    assert saved.extra["messages"][-2] == {"role": "user", "content": "more?"}
    from tova_cpp import Llama

    def answer(m, convo):  # what `tova generate` does with a conversation: its template, its stop strings
        prompt, stops = m.chat_prompt(convo)
        out = list(m.stream_generate(prompt, max_tokens=6, temperature=0.0, stop=stops))
        return "".join(r.text for r in out), out[-1].prompt_tokens_evaluated

    with Llama(model_path=bytes_path, budget=16, chunk=8, n_threads=2) as m:
        convo = [{"role": "user", "content": "hi"}]
        a, _ = answer(m, convo)
        convo += [{"role": "assistant", "content": a}, {"role": "user", "content": "more?"}]
        b, b_evaluated = answer(m, convo)
    assert one.stdout.strip() == a.strip()
    assert two.stdout.strip() == b.strip()
    assert prompt_tokens(two.stderr) == b_evaluated  # the resumed run evaluated only the new turn


@pytest.mark.parametrize("damage", ["budget", "corrupt"])
def test_cli_mismatching_session_is_one_error_line(bytes_path, tmp_path, damage):
    flags = ("generate", "-m", bytes_path, "-n", "4", "--temp", "0", "-t", "2", "--session", "g.tova")
    assert tova(*flags, "--budget", "16", "-p", "hi", cwd=tmp_path).returncode == 0
    if damage == "corrupt":
        data = bytearray((tmp_path / "g.tova").read_bytes())
        data[100] ^= 1
        (tmp_path / "g.tova").write_bytes(bytes(data))
    before = (tmp_path / "g.tova").read_bytes()
    r = tova(*flags, "--budget", "8" if damage == "budget" else "16", "-p", "more", cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")
    assert ("budget=16" if damage == "budget" else "corrupted") in r.stderr
    assert (tmp_path / "g.tova").read_bytes() == before


# -- truncate: a reply cut by a stop string, without re-reading the history --------------------------------
def check_window(s: Session) -> None:
    lo, hi = s.pos_window()
    assert (lo, hi) == (s.n_past - s.n_occupied, s.n_past - 1)  # a batch must start at seq_pos_max + 1
    for row in s.cell_positions():
        row = row[row >= 0]
        assert row.size == s.n_occupied  # every layer holds as many rows as llama.cpp has cells
        assert np.unique(row).size == row.size and row.max() < s.n_past


def count_decoded(monkeypatch, session) -> list[int]:
    """Records how many tokens each Session.eval call hands to the engine (one C call evaluates them all)."""
    real, seen = session.eval, []

    def counting(tokens, **kw):
        seen.append(len(tokens))
        return real(tokens, **kw)

    monkeypatch.setattr(session, "eval", counting)
    return seen


@pytest.mark.parametrize("policy", sorted(tova_cpp.POLICIES))
def test_truncate_removes_the_newest_tokens_from_every_layer(tiny_path, policy, monkeypatch):
    with Session(tiny_path, **{**tiny_kwargs(policy), "keep": 1}) as s:
        s.eval(tiny_prompt(policy))
        greedy(s, 3 if policy != "full" else 1)
        before = {tuple(sorted(r[r >= 0])) for r in s.cell_positions()}  # per layer, as sets
        kept = [set(r[r >= 0].tolist()) for r in s.cell_positions()]
        n_occ, n_past = s.n_occupied, s.n_past
        s.truncate(n_past - 3)
        assert (s.n_past, s.n_occupied) == (n_past - 3, n_occ - 3)
        check_window(s)
        removed = set(range(n_past - 3, n_past))
        if policy == "tova":  # this prompt makes a layer evict one of them already: the extra-row path runs
            assert min(len(k & removed) for k in kept) < 3
        for layer, row in enumerate(s.cell_positions()):
            now = set(row[row >= 0].tolist())
            gone = kept[layer] - removed - now  # rows dropped to keep the layers' counts equal
            assert now <= kept[layer] - removed
            assert len(gone) == 3 - len(kept[layer] & removed)
            if gone and policy in ("tova", "window", "full"):
                # the oldest rows after the protected prefix (keep=1)
                assert sorted(gone) == sorted(kept[layer] - removed - {0})[: len(gone)]
        assert before  # the layers may differ (tova, h2o); each was handled on its own
        with pytest.raises(RuntimeError, match="evaluate a token first"):
            s.logits()  # the context's logits belong to a removed token
        decoded = count_decoded(monkeypatch, s)
        s.eval([7, 8])
        assert sum(decoded) == 2  # the follow-up evaluates only its own tokens
        assert s.n_past == n_past - 1
        check_window(s)
        assert np.isfinite(s.logits()).all()


def test_truncate_without_evictions_equals_never_seeing_the_tokens(tiny_path):
    prompt = tiny_prompt("tova")[:5]
    with Session(tiny_path, **tiny_kwargs("tova")) as s:
        s.eval(prompt + [9, 10])
        s.truncate(5)
        a = s.eval([11, 12], logits_all=True)
    with Session(tiny_path, **tiny_kwargs("tova")) as fresh:
        fresh.eval(prompt)
        b = fresh.eval([11, 12], logits_all=True)
    np.testing.assert_array_equal(a, b)  # same cells, same rows: exact


def test_truncate_that_is_refused_changes_nothing(tiny_path):
    with Session(tiny_path, **tiny_kwargs("tova")) as s:
        s.eval(tiny_prompt("tova"))
        before = snapshot(s)
        lo, _ = s.pos_window()
        with pytest.raises(ValueError, match="oldest position"):
            s.truncate(lo)
        with pytest.raises(ValueError, match="n_past"):
            s.truncate(s.n_past + 1)
        assert snapshot(s) == before
        s.truncate(0)
        assert (s.n_past, s.n_occupied) == (0, 0)


def test_llama_reply_cut_by_a_stop_string_continues_without_rereading(bytes_path, monkeypatch):
    from tova_cpp import Llama

    with Llama(model_path=bytes_path, budget=16, chunk=8, n_threads=2) as m:
        full = m("hello", max_tokens=30, temperature=0.0)["choices"][0]["text"]
        stop = full[12:15]
        cut = full[: full.find(stop)]
        out = m("hello", max_tokens=30, temperature=0.0, stop=stop)
        assert out["choices"][0]["text"] == cut
        # the cache holds the prompt and the reply up to the stop, nothing past it (the random model writes
        # invalid UTF-8, shown as U+FFFD in the reply: the cut backs off to the last token whose text matches)
        held = m.detokenize(m._cached).decode(errors="replace")
        prefix = m.detokenize(m.tokenize("hello")).decode(errors="replace")
        assert held.startswith(prefix) and cut.startswith(held[len(prefix) :])
        assert m.session.n_past > len(m.tokenize("hello"))
        check_window(m.session)
        n_past = m.session.n_past
        decoded = count_decoded(monkeypatch, m.session)
        nxt = "hello" + cut + " and then"
        follow = m(nxt, max_tokens=2, temperature=0.0)
        rest = len(m.tokenize(nxt)) - n_past  # what the cache does not hold yet (one token per byte here)
        # the new text only, far less than re-reading the conversation (the reply's invalid bytes come back
        # as U+FFFD, which the cache's text matches, so `rest` is an upper bound)
        evaluated = follow["usage"]["prompt_tokens_evaluated"]
        assert 0 < evaluated <= rest
        assert evaluated < len(m.tokenize(nxt)) - 5
        assert m.session.n_past == n_past + evaluated + 1
        assert sum(decoded) == evaluated + 1  # the new text, then one generated token


def test_a_truncated_session_saves_and_resumes(tiny_path, tmp_path):
    with Session(tiny_path, **tiny_kwargs("h2o")) as a:
        a.eval(tiny_prompt("h2o"))
        greedy(a, 3)
        a.truncate(a.n_past - 2)
        a.save(tmp_path / "t.tova")
        ref = a.eval([4, 5, 6], logits_all=True)
        ref_kept = a.kept_positions()
    with Session(tiny_path, **tiny_kwargs("h2o")) as b:
        b.load(tmp_path / "t.tova")
        with pytest.raises(RuntimeError, match="evaluate a token first"):
            b.logits()  # as in the truncated session: its last logits belonged to a removed token
        np.testing.assert_array_equal(b.eval([4, 5, 6], logits_all=True), ref)
        np.testing.assert_array_equal(b.kept_positions(), ref_kept)
