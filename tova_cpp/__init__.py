"""tova_cpp: TOVA (Oren et al., "Transformers are Multi-State RNNs", EMNLP 2024) for llama.cpp GGUF models.

Each layer keeps the `budget` tokens with the highest attention from the newest query (averaged over heads).
The paper's baselines `window`, `sink` and `h2o` and a protected prefix (`keep`) run on the same engine."""

from .errors import (
    Cancelled,
    EngineError,
    ModelLoadError,
    NumericalError,
    SessionBusyError,
    SessionClosedError,
    StateError,
    TokenizerError,
    TovaError,
    TovaVersionError,
    UnsupportedModelError,
)
from .generate import GenerationResponse, generate, stream_generate
from .llama import Llama
from .models import default_model_path
from .session import POLICIES, Session, shared_models

__all__ = [
    "POLICIES",
    "Cancelled",
    "EngineError",
    "GenerationResponse",
    "Llama",
    "ModelLoadError",
    "NumericalError",
    "Session",
    "SessionBusyError",
    "SessionClosedError",
    "StateError",
    "TokenizerError",
    "TovaError",
    "TovaVersionError",
    "UnsupportedModelError",
    "default_model_path",
    "generate",
    "shared_models",
    "stream_generate",
]
__version__ = "0.1.0"
