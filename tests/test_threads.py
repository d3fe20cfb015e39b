"""The default thread count follows the cores other processes leave free (tova_cpp/threads.py); a given
n_threads never changes. Speeds are measured by scripts/bench_contention.py, not here."""

from __future__ import annotations

import time

import llama_cpp
import numpy as np
import pytest
from tiny_gguf import write_tiny_llama

from tova_cpp import Session
from tova_cpp import threads as threads_mod
from tova_cpp.batch import BatchSession
from tova_cpp.threads import CLK_TCK, FreeCores, busy_ticks, read_cpu_ticks


class FakeProc:
    """/proc readings and a clock that the test advances: `others` cores busy, `own` cores of this process."""

    def __init__(self):
        self.t, self.busy, self.own = 0.0, 0, 0

    def run(self, seconds: float, others: float, own: float) -> None:
        self.t += seconds
        self.busy += round((others + own) * seconds * CLK_TCK)
        self.own += round(own * seconds * CLK_TCK)

    def reader(self, cpus):
        return self.busy, self.own


def governor(max_threads=2, cpus=frozenset({0, 1})):
    proc = FakeProc()
    return proc, FreeCores(max_threads, set(cpus), reader=proc.reader, clock=lambda: proc.t)


def test_one_busy_process_takes_one_of_two_threads_and_gives_it_back():
    proc, fc = governor()
    proc.run(1.0, others=0.0, own=2.0)
    assert fc.poll() == 2
    proc.run(1.0, others=1.0, own=1.0)  # a busy process beside us
    assert fc.poll() == 1 and fc.others == pytest.approx(1.0)
    proc.run(1.0, others=1.0, own=1.0)
    assert fc.poll() == 1
    proc.run(1.0, others=0.0, own=1.0)  # it ended
    assert fc.poll() == 2


def test_spinning_peers_do_not_hide_the_busy_process():
    """Two threads beside a busy process starve it (0.6 of a core): still more than half a core taken."""
    proc, fc = governor()
    proc.run(1.0, others=0.6, own=1.4)
    assert fc.poll() == 1


def test_grows_only_when_the_extra_core_is_mostly_free():
    proc, fc = governor()
    proc.run(1.0, others=1.0, own=1.0)
    assert fc.poll() == 1
    proc.run(1.0, others=0.4, own=1.0)  # 1.6 cores free: rounds to 2, but stays at 1 (hysteresis)
    assert fc.poll() == 1
    proc.run(1.0, others=0.2, own=1.0)
    assert fc.poll() == 2


def test_reads_proc_at_most_every_period():
    proc, fc = governor()
    calls = []
    fc.reader = lambda cpus: calls.append(1) or proc.reader(cpus)
    for _ in range(100):
        proc.run(threads_mod.PERIOD / 10, others=0.0, own=1.0)
        fc.poll()
    assert 8 <= len(calls) <= 10


def test_never_more_than_max_threads_nor_fewer_than_one():
    proc, fc = governor(max_threads=1, cpus={0, 1, 2, 3})
    proc.run(1.0, others=0.0, own=1.0)
    assert fc.poll() == 1
    proc, fc = governor(max_threads=4, cpus={0, 1, 2, 3})
    proc.run(1.0, others=8.0, own=1.0)
    assert fc.poll() == 1


def test_unreadable_proc_keeps_the_given_count():
    def broken(cpus):
        raise OSError("no /proc")

    fc = FreeCores(2, {0, 1}, reader=broken)
    assert fc.poll() == 2


STAT = """cpu  1000 500 300 9000 10 7 3 2 0 0
cpu0 100 50 30 900 1 1 1 1 0 0
cpu1 200 60 40 800 2 2 2 2 0 0
cpu2 400 70 50 700 3 3 3 3 0 0
intr 12345
"""


def test_busy_ticks_counts_the_allowed_cpus_niced_time_included():
    assert busy_ticks(STAT, {0, 1}) == (100 + 50 + 30 + 1 + 1 + 1) + (200 + 60 + 40 + 2 + 2 + 2)
    assert busy_ticks(STAT, {2}) == 400 + 70 + 50 + 3 + 3 + 3


def test_real_proc_reads_this_process_cpu_time():
    cpus = threads_mod.allowed_cpus()
    busy0, own0 = read_cpu_ticks(cpus)
    start = time.process_time()
    while time.process_time() - start < 0.3:
        pass
    spent = time.process_time() - start
    busy1, own1 = read_cpu_ticks(cpus)
    assert 0.5 * spent * CLK_TCK <= own1 - own0 <= 1.5 * spent * CLK_TCK + 2  # utime + stime, this process
    assert busy1 >= busy0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("threads") / "tiny.gguf"
    write_tiny_llama(path)
    return path


def test_session_follows_the_governor_and_computes_the_same(tiny, monkeypatch):
    plan = iter([2, 1, 1, 2, 1, 2, 2, 1] * 4)
    monkeypatch.setattr(FreeCores, "poll", lambda self: next(plan))
    tokens = np.random.default_rng(0).integers(0, 64, 24).tolist()
    kw = {"budget": 8, "chunk": 4, "flash_attn": True, "type_k": "f32", "type_v": "f32"}
    with Session(tiny, **kw) as auto, Session(tiny, n_threads=2, **kw) as fixed:
        seen = []
        for t in tokens:
            auto.eval([t])
            fixed.eval([t])
            seen.append(auto.n_threads)
            assert llama_cpp.llama_n_threads(auto._ctx) == auto.n_threads
            np.testing.assert_array_equal(auto.logits(), fixed.logits())
            np.testing.assert_array_equal(auto.kept_positions(), fixed.kept_positions())
        assert set(seen) == {1, 2}
        assert fixed.n_threads == 2 and llama_cpp.llama_n_threads(fixed._ctx) == 2


def test_a_given_thread_count_is_never_changed(tiny, monkeypatch):
    monkeypatch.setattr(FreeCores, "poll", lambda self: 1)
    with Session(tiny, budget=8, n_threads=2) as s:
        for t in range(5):
            s.eval([t])
        assert s.n_threads == 2 and llama_cpp.llama_n_threads(s._ctx) == 2


def test_batch_session_follows_the_governor_and_computes_the_same(tiny, monkeypatch):
    plan = iter([2, 1, 1, 2, 1, 2, 2, 1] * 4)
    monkeypatch.setattr(FreeCores, "poll", lambda self: next(plan))
    rng = np.random.default_rng(1)
    kw = {"n_seq_max": 3, "budget": 8, "chunk": 4, "type_k": "f32", "type_v": "f32"}
    with BatchSession(tiny, **kw) as auto, BatchSession(tiny, n_threads=2, **kw) as fixed:
        for s in (auto, fixed):
            assert [s.add() for _ in range(3)] == [0, 1, 2]
        seen = []
        for step in range(12):
            batch = {q: rng.integers(0, 64, 5 if step == q else 1).tolist() for q in range(3)}
            got, want = auto.step(batch), fixed.step(batch)
            seen.append(auto.n_threads)
            assert llama_cpp.llama_n_threads(auto._ctx) == auto.n_threads
            for q in range(3):
                np.testing.assert_array_equal(got[q], want[q])
                np.testing.assert_array_equal(auto.kept_positions(q), fixed.kept_positions(q))
        assert set(seen) == {1, 2}
        assert fixed.n_threads == 2 and llama_cpp.llama_n_threads(fixed._ctx) == 2
