"""`tova serve`: an OpenAI-compatible HTTP server over bounded TOVA caches (docs/SERVER.md).

Each of `--slots` slots is one sequence of a batched engine with `--budget` cells per layer: a conversation
of any length runs in constant memory and never meets a context error. Concurrent requests share one
batched decode per step (tova_cpp/server/scheduler.py); the HTTP layer is tova_cpp/server/app.py.
Needs the [server] extra (FastAPI, uvicorn, sse-starlette).
"""

from __future__ import annotations

from pathlib import Path


def build(
    model_path: str,
    *,
    n_slots: int,
    budget: int,
    keep: int = 0,
    chunk: int = 256,
    chat_format: str | None = None,
    max_tokens_limit: int = 4096,
    max_queue: int = 256,
    max_batch_tokens: int = 512,
    max_body_bytes: int = 8 * 2**20,
    api_key: str | None = None,
    sampling_defaults: dict | None = None,
    stops: list[str] | None = None,
    penalty_last_n: int = 64,
    park_dir: str | None = None,
    verbose: bool = False,
    **engine,
):
    """The FastAPI app, its engine loaded and its engine thread started (closed by the app's shutdown).
    `engine` holds tova_cpp.batch.BatchSession's other keywords (policy, evict_interval, n_ubatch, n_threads,
    n_gpu_layers, flash_attn, type_k, type_v, n_sink), passed on as they are."""
    from ..batch import BatchSession
    from .app import create_app
    from .protocol import Limits
    from .scheduler import Scheduler
    from .vocab import Vocab

    vocab = Vocab(model_path, chat_format=chat_format, verbose=verbose)
    # one context, --slots sequences: concurrent requests share every batched decode
    if park_dir is not None:  # parking a slot saves one sequence: supported on the unified cache only
        engine.setdefault("kv_unified", True)
    engine = BatchSession(
        model_path, n_seq_max=n_slots, budget=budget, keep=keep, chunk=chunk, verbose=verbose, **engine
    )
    try:
        scheduler = Scheduler(
            engine,
            vocab,
            n_slots=n_slots,
            budget=budget,
            keep=keep,
            chunk=chunk,
            max_batch_tokens=max_batch_tokens,
            max_queue=max_queue,
            park_dir=park_dir,
        )
    except BaseException:
        engine.close()
        raise
    limits = Limits(
        budget=budget,
        policy=engine.policy,
        keep=keep,
        max_tokens=max_tokens_limit,
        defaults=sampling_defaults,
        stops=stops,
        penalty_last_n=penalty_last_n,
    )
    return create_app(
        scheduler,
        vocab,
        limits,
        model_id=Path(model_path).name,
        api_key=api_key,
        max_body_bytes=max_body_bytes,
    )
