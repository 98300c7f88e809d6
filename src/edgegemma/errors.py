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


class UpdateError(EdgeGemmaError):
    """An adapter package could not be packed, published, pulled or installed. The version
    installed before stays in place; the subclasses say which check refused the update."""


class PublishError(UpdateError):
    """Publishing to an adapter repository was refused: a key the root does not name, a
    version not newer than the one published, a package whose files do not match its
    manifest."""


class UntrustedUpdateError(UpdateError):
    """The repository's metadata or a file failed TUF's verification: nothing from that
    update was installed."""


class BadSignatureError(UntrustedUpdateError):
    """Metadata is not signed by the threshold of keys its trusted root names."""


class ExpiredUpdateError(UntrustedUpdateError):
    """The repository's metadata has expired: its publisher stopped signing, or a mirror
    serves an old copy (a freeze attack)."""


class RollbackError(UntrustedUpdateError):
    """The repository offers metadata older than the device has seen, or an adapter version
    older than (or rolled back from) the installed one."""


class MixAndMatchError(UntrustedUpdateError):
    """The repository's metadata files disagree: a snapshot or targets file from another
    publish than the one the timestamp names."""


class TamperedUpdateError(UntrustedUpdateError):
    """A downloaded file's length or sha256 differs from what the signed metadata records."""


class OversizeError(UntrustedUpdateError):
    """A download is longer than its signed length, or than this device accepts."""


class BaseModelMismatchError(UpdateError):
    """The adapter was trained for another base model than the one this device runs (nor a
    variant built from it)."""


class AdapterRejectedError(UpdateError):
    """The engine refused to load the downloaded adapter (its header, shapes or values)."""


class AcceptanceError(UpdateError):
    """The adapter scored below its acceptance set's minimum on this device's backend."""

    def __init__(self, message: str, *, score: float, min_score: float):
        super().__init__(message)
        self.score = score
        self.min_score = min_score


class StoreFullError(UpdateError):
    """The adapter store's disk has no room for the update."""
