"""The policy unit alone (csrc/policy.cpp through tova_policy_evict), on synthetic arrays."""

import numpy as np
import pytest

from tova_cpp._ffi import ffi, lib


def evict(score, pos, k):
    score = np.ascontiguousarray(score, dtype=np.float32)
    pos = np.ascontiguousarray(pos, dtype=np.int32)
    out = np.full(max(k, 1), -9, dtype=np.int32)
    n = lib.tova_policy_evict(
        ffi.cast("float *", score.ctypes.data),
        ffi.cast("int32_t *", pos.ctypes.data),
        len(score),
        k,
        ffi.cast("int32_t *", out.ctypes.data),
    )
    return sorted(out[:n].tolist())


def test_lowest_scores_are_evicted():
    assert evict([0.5, 0.1, 0.3, 0.05, 0.9], [0, 1, 2, 3, 4], 2) == [1, 3]


def test_newest_token_can_be_evicted():
    assert evict([0.4, 0.3, 0.2, 0.01], [0, 1, 2, 3], 1) == [3]


def test_empty_cells_are_never_chosen():
    assert evict([0.0, 0.2, 0.0, 0.1], [-1, 5, -1, 6], 1) == [3]
    assert evict([0.0, 0.2], [-1, 5], 3) == [1]  # asks for more than are occupied: all occupied


def test_ties_evict_the_older_position():
    assert evict([0.2, 0.2, 0.2], [7, 3, 9], 1) == [1]


@pytest.mark.parametrize("k", [1, 17, 32, 33, 100])  # k <= 32: one pass; larger: a partial sort
@pytest.mark.parametrize("seed", range(5))
def test_matches_numpy_argsort(seed, k):
    rng = np.random.default_rng(seed)
    score = rng.random(300).astype(np.float32)
    score[rng.random(300) < 0.3] = 0.5  # many ties: the older position goes first
    pos = rng.permutation(300).astype(np.int32)
    pos[rng.random(300) < 0.2] = -1
    occupied = np.flatnonzero(pos >= 0)
    expect = occupied[np.lexsort((pos[occupied], score[occupied]))[:k]]
    assert sorted(evict(score, pos, k)) == sorted(expect.tolist())


# -- every policy through tova_policy_choose ------------------------------------------------------------
from tova_cpp.session import POLICIES  # noqa: E402


def choose(policy, pos, k, score=None, keep=0, n_sink=4):
    pos = np.ascontiguousarray(pos, dtype=np.int32)
    sc = ffi.NULL
    if score is not None:
        score = np.ascontiguousarray(score, dtype=np.float64)
        sc = ffi.cast("double *", score.ctypes.data)
    out = np.full(max(k, 1), -9, dtype=np.int32)
    n = lib.tova_policy_choose(
        POLICIES[policy],
        sc,
        ffi.cast("int32_t *", pos.ctypes.data),
        len(pos),
        k,
        keep,
        n_sink,
        ffi.cast("int32_t *", out.ctypes.data),
    )
    assert n >= 0, n
    return sorted(out[:n].tolist())


# cells are deliberately not in position order: the policies must read positions, not cell indices
POS = [9, 2, 7, 0, 5, 1, 8, 3, 6, 4]  # cell i holds original position POS[i]


def cells_of(positions):
    return sorted(POS.index(p) for p in positions)


def test_window_evicts_the_oldest():
    assert choose("window", POS, 3) == cells_of([0, 1, 2])


def test_sink_keeps_the_first_n_sink_and_evicts_the_oldest_after_them():
    assert choose("sink", POS, 3, n_sink=4) == cells_of([4, 5, 6])
    assert choose("sink", POS, 3, n_sink=0) == choose("window", POS, 3)


def test_full_evicts_nothing():
    assert choose("full", POS, 3) == []


def test_tova_matches_tova_policy_evict_without_keep():
    rng = np.random.default_rng(1)
    score = rng.random(10)
    assert choose("tova", POS, 4, score) == evict(score.astype(np.float32), POS, 4)


def test_h2o_keeps_the_recent_half_and_the_heavy_hitters():
    # 10 cells, k=2: 8 kept = 4 recent (positions 6..9) + 4 heavy among positions 0..5
    acc = np.zeros(10)
    for p, a in {0: 5.0, 1: 0.1, 2: 3.0, 3: 0.2, 4: 4.0, 5: 2.0, 6: 0.0, 7: 0.0, 8: 0.0, 9: 0.0}.items():
        acc[POS.index(p)] = a
    assert choose("h2o", POS, 2, acc) == cells_of([1, 3])  # the recent ones have the lowest scores, yet stay


def test_h2o_odd_budget_gives_the_recent_half_the_extra_cell():
    # 10 cells, k=3: 7 kept = 4 recent (positions 6..9) + 3 heavy among 0..5
    acc = np.zeros(10)
    for p, a in {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0, 4: 5.0, 5: 6.0}.items():
        acc[POS.index(p)] = a
    assert choose("h2o", POS, 3, acc) == cells_of([0, 1, 2])
    # with 3 recent + 4 heavy, position 6 (score 0) would be evicted instead of position 2
    assert POS.index(6) not in choose("h2o", POS, 3, acc)


def test_h2o_ties_evict_the_older():
    acc = np.ones(10)
    assert choose("h2o", POS, 2, acc) == cells_of([0, 1])


@pytest.mark.parametrize("policy", ["tova", "window", "sink", "h2o"])
def test_keep_is_never_evicted(policy):
    rng = np.random.default_rng(2)
    score = rng.random(10)
    score[POS.index(0)] = score[POS.index(1)] = score[POS.index(2)] = -1.0  # the lowest scores of all
    chosen = choose(policy, POS, 4, score, keep=3)
    assert len(chosen) == 4
    assert not set(chosen) & set(cells_of([0, 1, 2]))


def test_h2o_with_keep_halves_the_unprotected_budget():
    # keep=3: 10 cells, k=2 -> 8 kept = 3 protected + 5 unprotected = 3 recent (7..9) + 2 heavy among 3..6
    acc = np.zeros(10)
    for p, a in {3: 1.0, 4: 4.0, 5: 3.0, 6: 2.0}.items():
        acc[POS.index(p)] = a
    assert choose("h2o", POS, 2, acc, keep=3) == cells_of([3, 6])


def test_window_with_keep_evicts_the_oldest_unprotected():
    assert choose("window", POS, 3, keep=2) == cells_of([2, 3, 4])
    assert choose("sink", POS, 3, keep=6, n_sink=2) == cells_of([6, 7, 8])  # the larger prefix wins


def test_empty_cells_are_never_chosen_by_any_policy():
    pos = [-1, 3, -1, 0, 2, 1, -1]
    for policy in ("window", "sink", "h2o", "tova"):
        chosen = choose(policy, pos, 2, np.zeros(7), n_sink=0)
        assert len(chosen) == 2 and all(pos[c] >= 0 for c in chosen), policy


def test_choose_refuses_bad_arguments():
    pos = np.arange(4, dtype=np.int32)
    p = ffi.cast("int32_t *", pos.ctypes.data)
    out = np.zeros(4, dtype=np.int32)
    o = ffi.cast("int32_t *", out.ctypes.data)
    assert lib.tova_policy_choose(99, ffi.NULL, p, 4, 1, 0, 4, o) == -1  # unknown policy
    assert lib.tova_policy_choose(POLICIES["tova"], ffi.NULL, p, 4, 1, 0, 4, o) == -1  # tova needs scores
    assert lib.tova_policy_choose(POLICIES["h2o"], ffi.NULL, p, 4, 1, 0, 4, o) == -1  # h2o too
    assert lib.tova_policy_choose(POLICIES["window"], ffi.NULL, p, 4, 1, -1, 4, o) == -1  # keep < 0
    assert lib.tova_policy_choose(POLICIES["window"], ffi.NULL, ffi.NULL, 4, 1, 0, 4, o) == -1
    assert lib.tova_policy_choose(POLICIES["window"], ffi.NULL, p, 4, 1, 0, 4, o) == 1  # window needs none
