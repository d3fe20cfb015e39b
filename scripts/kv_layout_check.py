"""llama.cpp alone (no tova_cpp engine, no eviction): does one sequence's output depend on which cells of a
unified KV cache it occupies? It decodes the same prompt into sequence 0 of a fresh context with the server's
settings (unified cache, pieces of 64 tokens), once on an empty cache and once after N other sequences took
cells (N = 3 and 31, and 31 decoded in the same batches as the prompt), and prints how far the logits of the
prompt's last 64 tokens move: in units of the largest logit, in nats, and the largest change of the gap
between two of the reference's 5 most likely tokens (what decides whether a greedy pick can flip). Then it
changes what the other sequences hold (same cells): 0 means nothing leaks between sequences, only the layout
moves the arithmetic. This is why `tova serve`'s greedy streams may part from the same conversation run alone
(docs/SERVER.md, "Batched arithmetic"); tests/test_server_load.py takes its near-tie margin from here.

    python scripts/kv_layout_check.py [-m MODEL.gguf] [--prompts 3]
"""

from __future__ import annotations

import argparse
import random

import llama_cpp
import llama_cpp._logger
import numpy as np

PIECE = 64
OTHER = 40  # tokens each other sequence holds
WORDS = (
    "river mountain city engine garden history music science ocean forest market letter window station "
    "harbor bridge winter summer lantern pocket silver copper meadow valley thunder whisper candle"
).split()


def tokenize(model, text: str) -> list[int]:
    vocab = llama_cpp.llama_model_get_vocab(model)
    buf = (llama_cpp.llama_token * (len(text) + 16))()
    n = llama_cpp.llama_tokenize(vocab, text.encode(), len(text.encode()), buf, len(buf), True, True)
    if n < 0:
        raise RuntimeError("tokenization failed")
    return list(buf[:n])


def decode(ctx, n_vocab: int, parts: list[tuple[int, list[int], int]], want: int) -> np.ndarray:
    """One llama_decode of several sequences' pieces (seq, tokens, first position); returns the logits of
    every token of sequence `want` (rows of its piece), [n, n_vocab]."""
    n = sum(len(t) for _, t, _ in parts)
    b = llama_cpp.llama_batch_init(n, 0, 1)
    try:
        b.n_tokens = n
        i, rows = 0, []
        for seq, tokens, pos0 in parts:
            for j, t in enumerate(tokens):
                b.token[i], b.pos[i], b.n_seq_id[i] = t, pos0 + j, 1
                b.seq_id[i][0] = seq
                b.logits[i] = seq == want
                if seq == want:
                    rows.append(i)
                i += 1
        if llama_cpp.llama_decode(ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        if not rows:
            return np.empty((0, n_vocab), dtype=np.float32)
        return np.stack(
            [np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, r), shape=(n_vocab,)) for r in rows]
        ).copy()
    finally:
        llama_cpp.llama_batch_free(b)


def prompt_logits(model, n_vocab, prompt, others: int, flash_attn: bool, together: bool, seed: int):
    """Logits of the prompt's last piece in sequence 0, beside `others` sequences of OTHER tokens each (decoded
    before it, or in the same batches when `together`)."""
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx, cp.n_seq_max, cp.kv_unified = 8192, 32, True
    cp.n_batch, cp.n_ubatch = 4096, 512
    cp.n_threads = cp.n_threads_batch = 1
    cp.flash_attn_type = (
        llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    )
    ctx = llama_cpp.llama_init_from_model(model, cp)
    rng = random.Random(seed)
    other = [[rng.randrange(200, 40000) for _ in range(OTHER)] for _ in range(others)]
    try:
        if not together:
            for s, toks in enumerate(other, 1):
                decode(ctx, n_vocab, [(s, toks, 0)], -1)
        out = None
        for i in range(0, len(prompt), PIECE):
            parts = [(0, prompt[i : i + PIECE], i)]
            if together and i < OTHER:
                parts += [
                    (s, toks[i : i + PIECE], i) for s, toks in enumerate(other, 1) if toks[i : i + PIECE]
                ]
            out = decode(ctx, n_vocab, parts, 0)
        return out
    finally:
        llama_cpp.llama_free(ctx)


def engine_logits(model: str, policy: str, prompt, others, forced=None, n_decode: int = 16) -> np.ndarray:
    """Through tova_cpp's engine as `tova serve` runs it (BatchSession, 32 sequences, budget 32, pieces of 64):
    logits of the prompt's last token and of n_decode greedy steps in sequence 0, with `others` (token lists)
    fed in the same steps. The steps take the tokens `forced` (a run alone's greedy picks) when given."""
    from tova_cpp.batch import BatchSession

    with BatchSession(
        model, n_seq_max=32, budget=32, chunk=PIECE, policy=policy, n_ubatch=PIECE, n_threads=1
    ) as s:
        seqs = [s.add() for _ in range(1 + len(others))]
        todo = {q: list(t) for q, t in zip(seqs, [prompt, *others], strict=True)}
        last: dict[int, np.ndarray] = {}
        while any(todo.values()):
            step = {q: t[:PIECE] for q, t in todo.items() if t}
            last.update(s.step(step))
            for q in step:
                del todo[q][:PIECE]
        out = [last[seqs[0]]]
        for i in range(n_decode):
            tok = int(out[-1].argmax()) if forced is None else int(forced[i])
            step = {q: [tok if q == seqs[0] else int(last[q].argmax())] for q in seqs}
            last.update(s.step(step))
            out.append(last[seqs[0]])
        return np.stack(out)


def compare(ref: np.ndarray, got: np.ndarray) -> tuple[float, float, float]:
    """(max |dlogit| / max |logit|, max |dlogit| in nats, max change of a gap between two of the reference's
    top-5 tokens) over the rows."""
    d = np.abs(ref - got)
    gaps = 0.0
    for r, g in zip(ref, got, strict=True):
        top = np.argsort(-r)[:5]
        dr = r[top][:, None] - r[top][None, :]
        dg = g[top][:, None] - g[top][None, :]
        gaps = max(gaps, float(np.abs(dr - dg).max()))
    return float(d.max() / np.abs(ref).max()), float(d.max()), gaps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default=None, help="GGUF (default: SmolLM2-135M-Instruct)")
    p.add_argument("--prompts", type=int, default=3, help="prompts (random words, the load test's format)")
    p.add_argument(
        "--engine",
        default="window,tova",
        help="also through tova_cpp's engine with these policies (comma-separated; '' skips)",
    )
    args = p.parse_args()
    if args.model is None:
        from tova_cpp.models import default_model_path

        args.model = str(default_model_path())
    llama_cpp._logger.set_verbose(False)
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(args.model.encode(), llama_cpp.llama_model_default_params())
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    print(
        "| flash attn | other sequences | dlogit / max logit | dlogit nats | top-5 gap change nats | leak |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    worst = [0.0, 0.0, 0.0]
    prompts = []
    for k in range(args.prompts):
        rng = random.Random(k)
        prompts.append(tokenize(model, " ".join(rng.choice(WORDS) for _ in range(300)) + ". Summarize it."))
    refs = {
        fa: [(t, prompt_logits(model, n_vocab, t, 0, fa, False, 0)) for t in prompts] for fa in (False, True)
    }
    for fa in (False, True):
        for others, together in ((3, False), (31, False), (31, True)):
            rows, leak = [], 0.0
            for k, (prompt, a) in enumerate(refs[fa]):
                b = prompt_logits(model, n_vocab, prompt, others, fa, together, 0)
                rows.append(compare(a, b))
                if k == 0:  # the same cells, other tokens in the other sequences
                    c = prompt_logits(model, n_vocab, prompt, others, fa, together, 1)
                    leak = float(np.abs(b - c).max())
            r = [max(x[i] for x in rows) for i in range(3)]
            worst = [max(w, x) for w, x in zip(worst, r, strict=True)]
            how = f"{others} {'in the same batches' if together else 'decoded before'}"
            print(f"| {'on' if fa else 'off'} | {how} | {r[0]:.2e} | {r[1]:.3f} | {r[2]:.3f} | {leak:.1e} |")
    print(
        f"largest: {worst[0]:.2e} of the largest logit, {worst[1]:.3f} nats; gap change {worst[2]:.3f} nats"
    )
    if args.engine:
        print("\nthrough the engine (BatchSession, budget 32, pieces of 64), alone vs beside 31 sequences:")
        print("| policy | dlogit / max logit | dlogit nats | top-5 gap change nats | greedy differs |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for policy in args.engine.split(","):
            rows, differs = [], 0
            for k, prompt in enumerate(prompts):
                rng = random.Random(100 + k)
                others = [
                    tokenize(model, " ".join(rng.choice(WORDS) for _ in range(rng.randrange(40, 80))))
                    for _ in range(31)
                ]
                a = engine_logits(args.model, policy, prompt, [])
                b = engine_logits(args.model, policy, prompt, others, forced=a.argmax(1))
                rows.append(compare(a, b))
                differs += int((a.argmax(1) != b.argmax(1)).sum())
            r = [max(x[i] for x in rows) for i in range(3)]
            n = len(prompts) * len(a)
            print(f"| {policy} | {r[0]:.2e} | {r[1]:.3f} | {r[2]:.3f} | {differs} of {n} |")
    llama_cpp.llama_model_free(model)


if __name__ == "__main__":
    main()
