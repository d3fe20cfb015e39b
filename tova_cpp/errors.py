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


class Cancelled(TovaError):
    """A progress callback stopped `Session.eval`; the tokens evaluated before it stay in the cache."""
