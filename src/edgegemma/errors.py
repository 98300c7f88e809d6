"""The exceptions edgegemma raises.

Every error that reaches user code is an :class:`EdgeGemmaError`, so an app can catch one
type and stay alive. The subclasses say which input was at fault.
"""

from __future__ import annotations


class EdgeGemmaError(Exception):
    """Base class of every error raised by edgegemma."""


class InvalidParameterError(EdgeGemmaError, ValueError):
    """A parameter is out of range or of the wrong type (max_tokens, temperature, ...)."""


class ModelError(EdgeGemmaError):
    """A model file is missing, corrupt, or not one this backend can run."""


class UnsupportedArchitectureError(ModelError):
    """A model's architecture (Gemma family) cannot do what was asked on this backend or
    format: :mod:`edgegemma.families` says why, before any work starts."""

    def __init__(self, message: str, *, architecture: str, capability: str | None):
        super().__init__(message)
        self.architecture = architecture
        self.capability = capability


class IntegrityError(ModelError):
    """A downloaded or cached file does not have the size or sha256 that models.lock pins."""

    def __init__(self, message: str, *, expected: str | None = None, actual: str | None = None):
        super().__init__(message)
        self.expected = expected
        self.actual = actual


class AdapterError(EdgeGemmaError):
    """A LoRA adapter cannot be loaded, does not fit the base model, or is misused."""


class NumericalError(EdgeGemmaError):
    """The runtime computed non-finite numbers (NaN or infinite logits): usually an adapter scale
    far too large for the model. The generation ended; the engine stays usable."""


class ContextOverflowError(EdgeGemmaError):
    """A request does not fit the context window under the chosen ``on_overflow`` policy."""

    def __init__(self, message: str, *, prompt_tokens: int, max_tokens: int | None, n_ctx: int):
        super().__init__(message)
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.n_ctx = n_ctx


class TimedOutError(EdgeGemmaError):
    """A call that has no partial answer (``classify``) ran past its ``timeout``; the engine
    stays usable."""


class BackendUnavailableError(EdgeGemmaError):
    """The requested backend is unknown, or its runtime package is not installed."""


class EngineClosedError(EdgeGemmaError):
    """The engine was closed; create a new one."""


class EngineBusyError(EdgeGemmaError):
    """A stream from this thread is still open on the engine; finish or close it first."""


class ConversionError(EdgeGemmaError):
    """Building a model or adapter in another format failed."""
