"""The policy unit alone (csrc/policy.cpp through tova_policy_evict), on synthetic arrays."""

import numpy as np
import pytest

from tova_cpp._ffi import ffi, lib


def evict(score, pos, k):
    score = np.ascontiguousarray(score, dtype=np.float32)
    pos = np.ascontiguousarray(pos, dtype=np.int32)
    out = np.full(max(k, 1), -9, dtype=np.int32)
    n = lib.tova_policy_evict(
        ffi.cast("float *", score.ctypes.data), ffi.cast("int32_t *", pos.ctypes.data), len(score), k,
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


@pytest.mark.parametrize("seed", range(5))
def test_matches_numpy_argsort(seed):
    rng = np.random.default_rng(seed)
    score = rng.random(300).astype(np.float32)
    pos = rng.permutation(300).astype(np.int32)
    pos[rng.random(300) < 0.2] = -1
    k = 17
    occupied = np.flatnonzero(pos >= 0)
    expect = sorted(occupied[np.argsort(score[occupied], kind="stable")[:k]].tolist())
    assert evict(score, pos, k) == expect
