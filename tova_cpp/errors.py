"""Typed errors: every refusal is one of these, raised before any decode."""


class TovaError(Exception):
    """Base class of tova_cpp errors."""


class TovaVersionError(TovaError, ImportError):
    """The installed llama-cpp-python is not the version the engine was built for."""


class ModelLoadError(TovaError, ValueError):
    """The model file is missing, truncated or not a GGUF file, or llama.cpp could not load it."""


class UnsupportedModelError(TovaError, ValueError):
    """The model's attention or cache cannot be managed per layer (sliding window, ALiBi, recurrent, MLA)."""


class EngineError(TovaError, RuntimeError):
    """The native engine reported a failure; the state was cleared."""


class SessionClosedError(TovaError, RuntimeError):
    """The session (or the Llama holding it) was closed; its native handles are gone."""


class SessionBusyError(TovaError, RuntimeError):
    """The session is in use by another thread; a session serves one thread at a time."""


class TokenizerError(TovaError, ValueError):
    """The model has no tokenizer (its GGUF says tokenizer.ggml.model "none"), or the text cannot be tokenized."""
