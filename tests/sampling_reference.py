"""The sampling path before the greedy fast path and the reused token-data array: a fresh llama.cpp token-data
array (ids 0..n-1, the logits, p = 0) through the sampler's chain, its selection accepted. The oracle of
tests/test_sampling.py and the "before" of scripts/sample_cost.py."""

from __future__ import annotations

import ctypes

import llama_cpp
import numpy as np

from tova_cpp.batch import _TOKEN_DATA


def reference_sample(sampler, logits: np.ndarray) -> int:
    """llama_sampler_sample's selection on an array of logits, through a fresh token-data array."""
    data = np.zeros(logits.size, dtype=_TOKEN_DATA)
    data["id"] = np.arange(logits.size, dtype=np.int32)
    data["logit"] = logits
    arr = llama_cpp.llama_token_data_array(
        data=data.ctypes.data_as(llama_cpp.llama_token_data_p), size=logits.size, selected=-1, sorted=False
    )
    llama_cpp.llama_sampler_apply(sampler.chain, ctypes.byref(arr))
    tok = int(arr.data[arr.selected].id)
    llama_cpp.llama_sampler_accept(sampler.chain, tok)
    return tok
