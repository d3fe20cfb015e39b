"""The engine thread of `tova serve`: requests wait in a queue, take a slot (one sequence of the engine), and
every step decodes all active slots in one batched call.

One thread owns the engine; the HTTP handlers (asyncio) only submit jobs and read their events from an
asyncio.Queue each. A step gives every decoding slot its last sampled token and every slot still reading its
prompt one piece of `chunk` tokens (pieces beyond `max_batch_tokens` wait for the next step, whole). A piece
is never split by the load, so a conversation is cut at the same places whatever else runs beside it.

A slot remembers the tokens its cache has seen. A request whose prompt extends them (a follow-up turn: the
same messages plus the reply and a new message; the reply may come back tokenized another way) takes that
slot and evaluates only the new tokens; any other request takes the least recently used free slot and
resets it. An evicted cache cannot be rolled back, so there is no partial prefix reuse.

With a park directory (`tova serve --park-dir DIR`), a free slot's conversation is not lost when a new one
needs the slot: it is saved to DIR first (BatchSession.save, with the tokens it has seen), and a later
follow-up of it is loaded back into a free slot (BatchSession.load) and evaluates only its new tokens. Files in
DIR of the same model and settings are found again after a restart; the oldest beyond `park_max` are deleted.
"""

from __future__ import annotations

import codecs
import collections
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..batch import sample_logits
from ..generate import Sampler, _stop_hold, log_normalizer


class QueueFull(Exception):
    """Every slot is busy and the queue holds its maximum of requests."""


@dataclass
class Request:
    """What a job asks for (validated by the HTTP layer)."""

    prompt: list[int]
    sampler: Sampler
    max_tokens: int | None
    stop: list[str] = field(default_factory=list)
    min_tokens: int = 0
    logprobs: int | None = None  # None: none; n: the sampled token's logprob and the n most likely
    budget: int | None = None  # None: the server's
    keep: int | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reused_prompt_tokens: int = 0
    evicted_tokens: int = 0

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.reused_prompt_tokens},
            "reused_prompt_tokens": self.reused_prompt_tokens,
            "evicted_tokens": self.evicted_tokens,
        }


class Job:
    """One request in flight. Events (dicts) arrive on `events`: {"text", "token", "logprob", "top"} per
    generated token, then {"finish_reason", "usage"}, or {"error", "status"}."""

    def __init__(self, request: Request, post: Callable[[dict], None]) -> None:
        self.id = uuid.uuid4().hex
        self.request = request
        self.post = post  # thread-safe: hands an event to the request's event loop
        self.cancelled = False  # set by the HTTP side (a disconnect), read by the engine thread
        self.submitted = time.monotonic()
        # engine thread only
        self.slot: Slot | None = None
        self.pending: list[int] = []
        self.last: int | None = None  # sampled, not yet evaluated
        self.usage = Usage(prompt_tokens=len(request.prompt))
        self.evicted_before = 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text, self.emitted = "", 0

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class Slot:
    index: int
    seq: int
    budget: int
    keep: int
    tokens: list[int] = field(default_factory=list)  # what the cache has seen, in order
    job: Job | None = None
    last_used: float = 0.0
    n_occupied: int = 0


@dataclass
class Parked:
    """A conversation saved to the park directory: its file and what its cache had seen."""

    path: Path
    tokens: list[int]
    budget: int
    keep: int


@dataclass
class Stats:
    """Counters for /metrics (written by the engine thread, read by the HTTP side: ints, no lock needed)."""

    prompt_tokens_evaluated: int = 0
    prompt_tokens_reused: int = 0
    generated_tokens: int = 0
    evicted_tokens: int = 0
    steps: int = 0
    step_seconds: float = 0.0
    parked: int = 0  # conversations saved to the park directory
    resumed: int = 0  # ... and loaded back for a follow-up
    finished: collections.Counter = field(default_factory=collections.Counter)


class Scheduler:
    """Owns the engine (a tova_cpp.batch.BatchSession or anything with its interface) on one thread."""

    def __init__(
        self,
        engine,
        vocab,
        *,
        n_slots: int,
        budget: int,
        keep: int = 0,
        chunk: int = 256,
        max_batch_tokens: int = 512,
        max_queue: int = 256,
        park_dir: str | Path | None = None,
        park_max: int = 256,
    ) -> None:
        self.engine, self.vocab = engine, vocab
        self.budget, self.keep, self.chunk = budget, keep, chunk
        self.max_batch_tokens = max(max_batch_tokens, chunk)
        self.max_queue = max_queue
        self.stats = Stats()
        self._eog = np.array([t for t in range(vocab.n_vocab) if vocab.is_eog(t)], dtype=np.int64)
        self.slots = [Slot(i, engine.add(), budget, keep) for i in range(n_slots)]
        self.park_dir, self.park_max = (Path(park_dir) if park_dir else None), park_max
        self._parked: list[Parked] = []  # oldest first
        if self.park_dir is not None:
            self.park_dir.mkdir(parents=True, exist_ok=True)
            self._parked = self._find_parked_files()
        self._inbox: collections.deque[Job] = collections.deque()
        self._waiting: collections.deque[Job] = collections.deque()
        self._active: list[Job] = []  # in admission order
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="tova-engine", daemon=True)
        self._thread.start()

    # -- the HTTP side ------------------------------------------------------------------------------------
    @property
    def queue_length(self) -> int:
        return len(self._inbox) + len(self._waiting)

    @property
    def busy_slots(self) -> int:
        return sum(s.job is not None for s in self.slots)

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._stop:
                raise QueueFull("the server is shutting down")
            if self.queue_length >= self.max_queue and self.busy_slots >= len(self.slots):
                raise QueueFull(f"all {len(self.slots)} slots are busy and {self.max_queue} requests wait")
            self._inbox.append(job)
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        job.cancel()
        with self._cv:
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join()
        self.engine.close()

    # -- the engine thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not (self._inbox or self._waiting or self._active):
                    self._cv.wait()
                if self._stop:
                    break
                self._waiting.extend(self._inbox)
                self._inbox.clear()
            try:
                self._drop_cancelled()
                self._admit()
                if self._active:
                    self._step()
            except Exception:  # a bug here must not kill the thread: fail what runs, go on
                traceback.print_exc(file=sys.stderr)
                for job in list(self._active):
                    self._fail(job, 500, "internal error in the engine loop", reset=True)
        for job in [*self._active, *self._waiting, *self._inbox]:
            self._finish(job, None, error=(503, "the server is shutting down"))

    def _drop_cancelled(self) -> None:
        for job in [j for j in self._waiting if j.cancelled]:
            self._waiting.remove(job)
            self._finish(job, "cancelled")
        for job in [j for j in self._active if j.cancelled]:
            self._finish(job, "cancelled")

    def _admit(self) -> None:
        free = [s for s in self.slots if s.job is None]
        if not free or not self._waiting:
            return
        # first the follow-ups whose conversation sits in a free slot, then the rest in arrival order
        for job in list(self._waiting):
            best = None
            for s in free:
                if (s.budget, s.keep) != self._settings(job) or not s.tokens:
                    continue
                new = self.vocab.continuation(s.tokens, job.request.prompt)
                if new is not None and (best is None or len(s.tokens) > len(best[0].tokens)):
                    best = (s, new)
            if best is not None:
                free.remove(best[0])
                self._waiting.remove(job)
                self._start(job, best[0], best[1])
        # then the follow-ups of parked conversations
        for job in list(self._waiting) if self._parked else []:
            parked, new = self._parked_for(job)
            if parked is None or not free:
                continue
            slot = min(free, key=lambda s: (bool(s.tokens), s.last_used))
            free.remove(slot)
            self._waiting.remove(job)
            if self._resume(slot, parked):
                self._start(job, slot, new)
            else:
                free.append(slot)
                self._waiting.appendleft(job)  # served as a new conversation below
        for job in list(self._waiting):
            if not free:
                return
            slot = min(free, key=lambda s: (bool(s.tokens), s.last_used))
            free.remove(slot)
            self._waiting.remove(job)
            try:
                self._park(slot)
                self._prepare(slot, job)
            except Exception as e:  # CapacityError (a ValueError) or an engine failure
                traceback.print_exc(file=sys.stderr)
                self._finish(job, None, error=(503, f"no room for this request's cache: {e}"))
                continue
            self._start(job, slot, list(job.request.prompt))

    def _settings(self, job: Job) -> tuple[int, int]:
        r = job.request
        return (r.budget or self.budget, self.keep if r.keep is None else r.keep)

    def _prepare(self, slot: Slot, job: Job) -> None:
        """An empty cache with the job's budget and keep in `slot`."""
        budget, keep = self._settings(job)
        slot.tokens = []
        slot.n_occupied = 0
        if (slot.budget, slot.keep) == (budget, keep):
            self.engine.reset(slot.seq)
            return
        self.engine.remove(slot.seq)
        try:
            slot.seq = self.engine.add(budget=budget, keep=keep)
        except Exception:
            slot.seq = self.engine.add()  # the server's settings always fit where they were
            slot.budget, slot.keep = self.budget, self.keep
            raise
        slot.budget, slot.keep = budget, keep

    # -- the park directory ------------------------------------------------------------------------------
    def _find_parked_files(self) -> list[Parked]:
        """Conversations parked by an earlier run with this model (others are left alone), oldest first."""
        from ..state import read_file

        found = []
        for path in sorted(self.park_dir.glob("*.tova"), key=lambda p: p.stat().st_mtime):
            try:
                st = read_file(path)
            except (OSError, ValueError):
                continue
            if st.model_id == self.engine.model_identity() and st.input_ids.size == st.n_tokens > 0:
                found.append(Parked(path, st.input_ids.tolist(), st.settings["budget"], st.settings["keep"]))
        return found

    def _parked_for(self, job: Job) -> tuple[Parked | None, list[int] | None]:
        """The longest parked conversation the job's prompt extends (its settings), and the new tokens."""
        best, best_new = None, None
        for p in self._parked:
            if (p.budget, p.keep) != self._settings(job):
                continue
            new = self.vocab.continuation(p.tokens, job.request.prompt)
            if new is not None and (best is None or len(p.tokens) > len(best.tokens)):
                best, best_new = p, new
        return best, best_new

    def _park(self, slot: Slot) -> None:
        """Save the free slot's conversation to the park directory (nothing without one or a conversation)."""
        if self.park_dir is None or not slot.tokens:
            return
        from ..state import write_file

        path = self.park_dir / f"{uuid.uuid4().hex}.tova"
        try:
            state = self.engine.save_state(slot.seq)
            state.input_ids = np.asarray(slot.tokens, dtype=np.int32)
            write_file(path, state)
        except Exception:  # a full disk loses this conversation, as without a park directory
            traceback.print_exc(file=sys.stderr)
            path.unlink(missing_ok=True)
            return
        self._parked.append(Parked(path, list(slot.tokens), slot.budget, slot.keep))
        self.stats.parked += 1
        while len(self._parked) > self.park_max:
            self._parked.pop(0).path.unlink(missing_ok=True)

    def _resume(self, slot: Slot, parked: Parked) -> bool:
        """Load a parked conversation into `slot` (parking the slot's own first). False when it cannot be
        loaded (the file is then dropped); the slot is then empty."""
        self._park(slot)
        slot.tokens, slot.n_occupied = [], 0
        self._parked.remove(parked)
        try:
            self.engine.remove(slot.seq)
            try:
                slot.seq = self.engine.load(None, parked.path)
            except Exception:
                slot.seq = self.engine.add()  # the server's settings always fit where they were
                slot.budget, slot.keep = self.budget, self.keep
                raise
        except Exception:
            traceback.print_exc(file=sys.stderr)
            parked.path.unlink(missing_ok=True)
            return False
        parked.path.unlink(missing_ok=True)
        slot.tokens, slot.budget, slot.keep = list(parked.tokens), parked.budget, parked.keep
        slot.n_occupied = self.engine.n_occupied(slot.seq)
        self.stats.resumed += 1
        return True

    def _start(self, job: Job, slot: Slot, new_tokens: list[int]) -> None:
        job.slot, slot.job = slot, job
        job.pending = new_tokens
        reused = len(job.request.prompt) - len(new_tokens)
        job.usage.reused_prompt_tokens = reused
        self.stats.prompt_tokens_reused += reused
        job.evicted_before = self.engine.n_past(slot.seq) - self.engine.n_occupied(slot.seq)
        self._active.append(job)

    def _step(self) -> None:
        batch: dict[int, list[int]] = {}
        jobs: list[Job] = []
        n = sum(1 for j in self._active if not j.pending)
        for job in self._active:
            if job.pending:
                piece = job.pending[: self.chunk]
                if n and n + len(piece) > self.max_batch_tokens:
                    continue  # whole pieces only: a piece waits rather than being split by the load
                n += len(piece)
            else:
                piece = [job.last]
            batch[job.slot.seq] = piece
            jobs.append(job)
        t0 = time.perf_counter()
        try:
            out = self.engine.step(batch)
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            # the engine may have emptied other sequences too (BatchSession does on an engine error)
            for job in list(self._active):
                if job in jobs or self._emptied(job.slot):
                    self._fail(job, 500, f"the engine failed: {e}", reset=True)
            for slot in self.slots:
                if slot.job is None and self._emptied(slot):
                    slot.tokens = []
            return
        self.stats.steps += 1
        self.stats.step_seconds += time.perf_counter() - t0
        for job in jobs:
            slot = job.slot
            piece = batch[slot.seq]
            slot.tokens.extend(piece)
            slot.n_occupied = self.engine.n_occupied(slot.seq)
            if job.pending:
                del job.pending[: len(piece)]
                self.stats.prompt_tokens_evaluated += len(piece)
                if job.pending:
                    continue
            try:
                self._sample(job, out[slot.seq])
            except Exception as e:
                traceback.print_exc(file=sys.stderr)
                self._fail(job, 500, f"sampling failed: {e}")

    def _emptied(self, slot: Slot) -> bool:
        """Whether the engine no longer holds what the slot remembers (its n_past counts every token seen)."""
        try:
            return self.engine.n_past(slot.seq) != len(slot.tokens)
        except Exception:
            return True

    def _sample(self, job: Job, logits: np.ndarray) -> None:
        r = job.request
        if not np.isfinite(logits).all():
            self._fail(job, 500, "the model produced non-finite logits", reset=True)
            return
        if job.usage.completion_tokens < r.min_tokens and self._eog.size:
            logits = logits.copy()
            logits[self._eog] = -np.inf
        tok = sample_logits(r.sampler, logits)
        event = {"token": tok, "text": ""}
        if r.logprobs is not None:
            lse = log_normalizer(logits)
            event["logprob"] = float(logits[tok]) - lse
            if r.logprobs:
                k = min(r.logprobs, logits.size)
                idx = np.argpartition(-logits, k - 1)[:k]
                idx = idx[np.argsort(-logits[idx], kind="stable")]
                event["top"] = [(int(i), float(logits[i]) - lse) for i in idx]
        if self.vocab.is_eog(tok):
            event["text"] = job.text[job.emitted :] + job.decoder.decode(b"", final=True)
            event["token"] = -1  # not part of the completion
            job.post(event)
            self._finish(job, "stop")
            return
        job.usage.completion_tokens += 1
        self.stats.generated_tokens += 1
        job.text += job.decoder.decode(self.vocab.piece(tok))
        hit = min((i for i in (job.text.find(s) for s in r.stop) if i >= 0), default=-1)
        if hit >= 0:
            event["text"] = job.text[job.emitted : hit]
            job.post(event)
            self._finish(job, "stop")
            return
        if r.max_tokens is not None and job.usage.completion_tokens >= r.max_tokens:
            job.text += job.decoder.decode(b"", final=True)
            event["text"] = job.text[job.emitted :]
            job.post(event)
            self._finish(job, "length")
            return
        upto = len(job.text) - _stop_hold(job.text, r.stop)
        event["text"] = job.text[job.emitted : upto]
        job.emitted = max(job.emitted, upto)
        job.last = tok
        job.post(event)

    def _fail(self, job: Job, status: int, message: str, *, reset: bool = False) -> None:
        if reset and job.slot is not None:
            try:
                self.engine.reset(job.slot.seq)
            except Exception:
                traceback.print_exc(file=sys.stderr)
            job.slot.tokens = []
        self._finish(job, None, error=(status, message))

    def _finish(self, job: Job, reason: str | None, *, error: tuple[int, str] | None = None) -> None:
        slot = job.slot
        if slot is not None:
            try:
                evicted = self.engine.n_past(slot.seq) - self.engine.n_occupied(slot.seq)
            except Exception:
                evicted = job.evicted_before
            job.usage.evicted_tokens = max(0, evicted - job.evicted_before)
            self.stats.evicted_tokens += job.usage.evicted_tokens
            slot.job, slot.last_used = None, time.monotonic()
            job.slot = None
        if job in self._active:
            self._active.remove(job)
        job.request.sampler.close()
        self.stats.finished[reason or "error"] += 1
        if error is not None:
            job.post({"error": error[1], "status": error[0]})
        else:
            job.post({"finish_reason": reason, "usage": job.usage.as_dict()})
