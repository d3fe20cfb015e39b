"""`tova bench ruler`: RULER's grading on known answers (against the package's own metric functions), the
generator wiring on small lengths, the answer prefix split, budgets per mode, the summary and the command."""

from __future__ import annotations

import csv
import importlib.util
import runpy

import pytest

from tova_cpp.bench import common, main, ruler

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("long_context_eval") is None
    or any(importlib.util.find_spec(m) is None for m in ruler.GENERATOR_MODULES),
    reason="RULER generators not installed: scripts/setup.sh installs nvidia-long-context-eval and the [bench] extra",
)


def _package_metrics():
    return runpy.run_path(str(ruler.package_dir() / "eval" / "synthetic" / "constants.py"))["TASKS"]


CASES = [
    ("niah", " 1234567.", ["1234567"], 100.0),
    ("niah", "The numbers are 111 and 333", ["111", "222", "333", "444"], 50.0),
    ("variable_tracking", "VAR AB, var cd and EF", ["AB", "CD", "EF", "GH"], 75.0),
    ("common_words_extraction", "1. Apple 2. pear", ["apple", "pear", "fig"], 100 * 2 / 3),
    ("freq_words_extraction", "nothing", ["abc"], 0.0),
    ("qa", "Paris, France", ["London", "paris"], 100.0),
    ("qa", "no idea", ["London", "Paris"], 0.0),
]


@pytest.mark.parametrize(("kind", "pred", "refs", "expect"), CASES)
def test_grading_matches_ruler(kind, pred, refs, expect):
    assert ruler.score(kind, pred, refs) == pytest.approx(expect)
    theirs = _package_metrics()[kind]["metric_fn_per_sample"]
    assert ruler.score(kind, pred, refs) == pytest.approx(theirs([ruler.postprocess_pred(pred)], [refs])[0])


def test_postprocess_is_evaluate_py():
    assert ruler.postprocess_pred("  \x01 42\tx \n") == "42\nx"


def test_task_configs_come_from_synthetic_yaml():
    cfg = ruler.task_configs()
    assert set(ruler.DEFAULT_TASKS) <= set(cfg)
    assert {cfg[t]["kind"] for t in ruler.DEFAULT_TASKS} == set(ruler.METRICS)
    assert cfg["qa_2"]["args"] == {"dataset": "hotpotqa"} and cfg["qa_2"]["tokens_to_generate"] == 32
    assert "{context}" in cfg["niah_single_2"]["template"]


@pytest.mark.parametrize(
    ("kind", "text", "prefix"),
    [
        (
            "niah",
            "A special magic number is hidden ... What is it? The special magic number for x is",
            "The special",
        ),
        ("qa", "Answer the question ... Question: who? Answer:", "Answer:"),
        (
            "variable_tracking",
            "Memorize ... Question: Find ... Answer: According to the chain(s)",
            "Answer: Acc",
        ),
    ],
)
def test_split_answer_prefix(kind, text, prefix):
    body, got = ruler.split_answer_prefix(kind, text)
    assert got.startswith(prefix) and body + " " + got == text
    with pytest.raises(common.BenchError, match="no answer prefix"):
        ruler.split_answer_prefix(kind, "nothing here")


def test_budget_per_compression():
    assert ruler.budget_for(4000, 0.875) == 500
    assert ruler.budget_for(4000, 0.5) == 2000
    assert ruler.budget_for(3, 0.9) == 1


def test_answer_modes_cut_once_or_per_chunk(monkeypatch):
    """fits: one piece holds the whole prompt (one cut after it); stream: pieces of --chunk; full: no cut."""
    seen = []

    class FakeSession:
        def __init__(self, path, *, budget, policy, chunk, n_threads, **kwargs):
            seen.append((policy, budget, chunk))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def eval(self, tokens):
            pass

        def logits(self):
            import numpy as np

            return np.array([0.0, 1.0])

        def is_eog(self, tok):
            return True

        def detokenize(self, toks):
            return ""

    monkeypatch.setattr(ruler, "Session", FakeSession)
    toks = list(range(1000))
    ruler.answer("m", toks, "tova", 0.75, "fits", 8, 1, 64)
    ruler.answer("m", toks, "tova", 0.75, "stream", 8, 1, 64)
    ruler.answer("m", toks, "full", 0.0, "-", 8, 1, 64)
    assert seen == [("tova", 250, 1000), ("tova", 250, 64), ("full", 1008, 512)]


def _s(task, mode, policy, comp, score):
    return ruler.SampleResult("m", task, 0, mode, policy, comp, 1, 100, score, "")


def test_summary_counts_full_in_both_modes_and_averages_complete_settings():
    samples = [
        _s("a", "-", "full", 0.0, 100.0),
        _s("b", "-", "full", 0.0, 50.0),
        _s("a", "fits", "tova", 0.5, 80.0),
        _s("b", "fits", "tova", 0.5, 40.0),
        _s("a", "stream", "tova", 0.5, 20.0),  # task b missing: no average for this setting
    ]
    out = {(s.task, s.mode, s.policy): s.score for s in ruler.summarize(samples)}
    assert out[("a", "fits", "full")] == out[("a", "stream", "full")] == 100.0
    assert out[("average", "fits", "tova")] == 60.0
    assert out[("average", "fits", "full")] == 75.0
    assert ("average", "stream", "tova") not in out


def test_generators_make_samples_with_the_model_tokenizer(smollm2_path, tmp_path):
    for task in ("niah_single_2", "vt"):
        rows = ruler.generate(task, smollm2_path, 2, 1024, tmp_path)
        assert len(rows) == 2 and (tmp_path / task / "validation.jsonl").is_file()
        for r in rows:
            assert 512 < r["length"] <= 1024
            assert all(ref in r["input"] for ref in r["outputs"])  # the answers are in the haystack
        assert rows[0]["input"] != rows[1]["input"]
    again = ruler.generate("vt", smollm2_path, 2, 1024, tmp_path)  # cached file reused
    assert again == rows


def test_generator_that_never_finishes_is_stopped(smollm2_path, tmp_path, monkeypatch):
    # RULER's QA generator retries forever when the length cannot hold its first set of documents
    monkeypatch.setattr(ruler, "GENERATOR_TIMEOUT", 20)
    with pytest.raises(common.BenchError, match="did not finish"):
        ruler.generate("qa_1", smollm2_path, 1, 256, tmp_path)


def test_ruler_command(smollm2_path, tmp_path, capsys):
    out = tmp_path / "r"
    argv = ["ruler", "-m", str(smollm2_path), "--tasks", "vt", "--length", "1024", "--n-samples", "1"]
    argv += ["--compressions", "0.5", "--policies", "full,tova", "--chunk", "64", "-t", "1", "-o", str(out)]
    assert main(argv) == 0
    with open(out / "ruler-samples.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["mode"], r["policy"]) for r in rows] == [("-", "full"), ("fits", "tova"), ("stream", "tova")]
    n = int(rows[0]["n_prompt"])
    assert int(rows[1]["budget"]) == int(rows[2]["budget"]) == round(0.5 * n)
    assert all(0 <= float(r["score"]) <= 100 for r in rows)
    with open(out / "ruler.csv", newline="") as f:
        summary = list(csv.DictReader(f))
    assert {(r["mode"], r["policy"]) for r in summary} == {
        ("fits", "full"),
        ("stream", "full"),
        ("fits", "tova"),
        ("stream", "tova"),
    }
    assert (out / "ruler.png").stat().st_size > 1000
    assert "| vt |" in capsys.readouterr().out
    assert (
        main(["ruler", "--combine", str(out / "ruler-samples.csv"), "-o", str(tmp_path / "c"), "--no-plot"])
        == 0
    )
    assert main(["ruler", "--modes", "fits,nope", "-o", str(tmp_path / "x")]) == 2


def test_prepared_samples_run_without_the_generators(smollm2_path, tmp_path, monkeypatch, capsys):
    """--prepare writes the tokenized samples and stops; --data runs them with the generators unavailable and
    answers as a run that generated them; another model's file or too few samples is a typed error."""
    prep = tmp_path / "prep"
    base = ["ruler", "-m", str(smollm2_path), "--tasks", "vt", "--length", "1024", "-t", "1", "--no-plot"]
    assert main([*base, "--n-samples", "2", "--prepare", "-o", str(prep)]) == 0
    assert not (prep / "ruler-samples.csv").exists()
    lines = (prep / ruler.DATA_FILE).read_text().splitlines()
    assert len(lines) == 2
    import json

    first = json.loads(lines[0])
    assert first["model"] == smollm2_path.name and first["kind"] == "variable_tracking"
    assert 512 < len(first["tokens"]) <= 1024 and first["outputs"]

    def no_generators():
        raise AssertionError("--data must not touch the generators")

    monkeypatch.setattr(ruler, "task_configs", no_generators)
    run = [*base, "--n-samples", "2", "--policies", "full,tova", "--compressions", "0.5", "--modes", "fits"]
    assert main([*run, "--data", str(prep / ruler.DATA_FILE), "-o", str(tmp_path / "a")]) == 0
    monkeypatch.undo()
    assert main([*run, "-o", str(tmp_path / "b")]) == 0  # generates the same samples (same seed)

    def rows(d):
        with open(tmp_path / d / "ruler-samples.csv", newline="") as f:
            return [(r["policy"], r["n_prompt"], r["budget"], r["pred"]) for r in csv.DictReader(f)]

    assert rows("a") == rows("b") and len(rows("a")) == 4
    assert (
        main([*run, "--data", str(prep / ruler.DATA_FILE), "--batch", "2", "-o", str(tmp_path / "a2")]) == 0
    )
    assert sorted(rows("a2")) == sorted(rows("a"))  # the batched path: same answers, grouped by policy
    capsys.readouterr()
    other = tmp_path / "other.jsonl"
    other.write_text(lines[0].replace(smollm2_path.name, "another.gguf") + "\n")
    assert main([*run, "--data", str(other), "-o", str(tmp_path / "c")]) == 2
    assert "tokenized for another.gguf" in capsys.readouterr().err
    assert (
        main([*base, "--n-samples", "3", "--data", str(prep / ruler.DATA_FILE), "-o", str(tmp_path / "d")])
        == 2
    )
    assert "2 sample(s) of 'vt', 3 asked" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"task": "vt"}\n')
    assert main([*run, "--data", str(tmp_path / "bad.jsonl"), "-o", str(tmp_path / "e")]) == 2
    assert "not a ruler-data.jsonl" in capsys.readouterr().err


def test_batched_group_keeps_its_answers_when_it_dies(smollm2_path, tmp_path, monkeypatch):
    """--batch writes each group's answers as they come (every SAVE_EVERY_S; 0 here: at every answer), so a group
    that dies midway (a crash, Ctrl-C) leaves those answers, and --resume answers only the rest: the rows equal
    an uninterrupted run's."""
    prep = tmp_path / "prep"
    base = ["ruler", "-m", str(smollm2_path), "--tasks", "vt", "--length", "1024", "-t", "1", "--no-plot"]
    assert main([*base, "--n-samples", "2", "--prepare", "-o", str(prep)]) == 0
    run = [*base, "--n-samples", "2", "--data", str(prep / ruler.DATA_FILE), "--policies", "tova"]
    run += ["--compressions", "0.5,0.875", "--modes", "fits", "--batch", "2"]
    assert main([*run, "-o", str(tmp_path / "whole")]) == 0
    monkeypatch.setattr(ruler, "SAVE_EVERY_S", 0.0)
    real = ruler.answer_batch

    def dies_after_two(*a, on_answer=None, **kw):
        seen = []

        def count(*x):
            on_answer(*x)
            seen.append(x)
            if len(seen) == 2:
                raise KeyboardInterrupt  # what Ctrl-C raises between two steps

        return real(*a, on_answer=count, **kw)

    monkeypatch.setattr(ruler, "answer_batch", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        main([*run, "-o", str(tmp_path / "cut")])
    monkeypatch.setattr(ruler, "answer_batch", real)

    def rows(d):
        with open(tmp_path / d / "ruler-samples.csv", newline="") as f:
            return sorted((r["index"], r["compression"], r["budget"], r["pred"]) for r in csv.DictReader(f))

    assert len(rows("cut")) == 2 and set(rows("cut")) < set(rows("whole"))
    calls = []
    monkeypatch.setattr(
        ruler, "answer_batch", lambda p, items, *a, **kw: calls.append(len(items)) or real(p, items, *a, **kw)
    )
    assert main([*run, "--resume", "-o", str(tmp_path / "cut")]) == 0
    assert calls == [2]  # only the two answers the interrupted group had not given
    assert rows("cut") == rows("whole")


@pytest.mark.parametrize(
    ("policy", "mode"), [("tova", "fits"), ("tova", "stream"), ("h2o", "fits"), ("full", "-")]
)
def test_batched_answers_are_the_lone_sessions(smollm2_path, policy, mode):
    """--batch: prompts of different lengths and budgets through one BatchSession of 2 sequences (so the third
    waits for a free place) give the same greedy answers and budgets as one Session each."""
    from tova_cpp import Session

    with Session(smollm2_path, budget=1, policy="full", chunk=1, n_threads=1) as tok:
        text = " ".join(f"Item {k} is a {['red', 'blue', 'green'][k % 3]} box." for k in range(60))
        base = tok.tokenize(text + " Question: which colour is item 7? Answer:", add_special=True)
    items = [(base[:n], comp, 6) for n, comp in ((300, 0.5), (260, 0.75), (420, 0.875))]
    items = [(t[:-40] + base[-40:], c, m) for t, c, m in items]  # every prompt ends with the question
    alone = [ruler.answer(smollm2_path, t, policy, c, mode, m, 1, 64) for t, c, m in items]
    batched = ruler.answer_batch(smollm2_path, items, policy, mode, 2, 1, 64)
    assert batched == alone
    assert any(pred.strip() for pred, _ in alone)  # answers, not three immediate end-of-generation tokens
    assert len({b for _, b in batched}) == 3  # three budgets in one session
