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


class StateError(TovaError, ValueError):
    """A saved session state does not fit this session (another model, budget, policy or cache type) or
    its file is truncated or corrupted; the session was left as it was."""


class NumericalError(TovaError, RuntimeError):
    """The model produced NaN or infinite logits (corrupt weights or input); nothing was sampled."""


class SessionClosedError(TovaError, RuntimeError):
    """The session (or the Llama holding it) was closed; its native handles are gone."""


class SessionBusyError(TovaError, RuntimeError):
    """The session is in use by another thread; a session serves one thread at a time."""


class TokenizerError(TovaError, ValueError):
    """The model has no tokenizer (its GGUF says tokenizer.ggml.model "none"), or the text cannot be tokenized."""


class CapacityError(TovaError, ValueError):
    """A new sequence does not fit in a BatchSession: its cells exceed those the other sequences leave free, or
    every sequence id is in use. Nothing changed; remove a sequence or wait (a server queues the request)."""


class UnknownSequenceError(TovaError, ValueError):
    """A BatchSession was given a sequence id that is not active (never added, or removed)."""
