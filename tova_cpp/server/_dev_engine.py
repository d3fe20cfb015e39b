"""TEMPORARY development adapter, to be deleted once tova_cpp.batch.BatchSession lands.

`SequentialSessions` offers the part of BatchSession's interface the scheduler uses, over one
tova_cpp.session.Session per sequence. It does NOT batch: `step` decodes the sequences one after another,
so concurrent requests do not share a decode.
"""

from __future__ import annotations

import numpy as np

from ..session import Session


class SequentialSessions:
    """BatchSession's interface over one Session per sequence; `step` decodes them one after another."""

    def __init__(self, model_path, *, n_seq_max: int, budget: int, **session_kwargs) -> None:
        self.model_path, self.n_seq_max, self.budget = str(model_path), n_seq_max, budget
        self.keep = session_kwargs.get("keep", 0)
        self._kwargs = session_kwargs
        self._seqs: dict[int, Session] = {}

    @property
    def sequences(self) -> list[int]:
        return sorted(self._seqs)

    def can_add(self, budget: int | None = None) -> bool:
        return len(self._seqs) < self.n_seq_max

    def add(self, *, budget: int | None = None, keep: int | None = None, evict_interval=None) -> int:
        if not self.can_add(budget):
            raise ValueError(f"all {self.n_seq_max} sequences are in use")
        kwargs = dict(self._kwargs)
        if keep is not None:
            kwargs["keep"] = keep
        if evict_interval is not None:
            kwargs["evict_interval"] = evict_interval
        seq = next(i for i in range(self.n_seq_max) if i not in self._seqs)
        self._seqs[seq] = Session(self.model_path, budget=budget or self.budget, **kwargs)
        return seq

    def remove(self, seq: int) -> None:
        self._seqs.pop(seq).close()

    def reset(self, seq: int) -> None:
        self._seqs[seq].reset()

    def eval(self, seq: int, tokens) -> np.ndarray:
        self._seqs[seq].eval(tokens)
        return self._seqs[seq].logits()

    def step(self, batch) -> dict[int, np.ndarray]:
        return {seq: self.eval(seq, toks) for seq, toks in batch.items()}

    def logits(self, seq: int) -> np.ndarray:
        return self._seqs[seq].logits()

    def n_occupied(self, seq: int) -> int:
        return self._seqs[seq].n_occupied

    def n_past(self, seq: int) -> int:
        return self._seqs[seq].n_past

    def close(self) -> None:
        for seq in list(self._seqs):
            self.remove(seq)
