"""The backend interface: what a runtime must do, and what it declares it can do.

A backend is the strict point of cut-off between edgegemma's policy and a native runtime. It
speaks plain primitives only: token ids, bytes, opaque adapter handles. Everything every
backend would otherwise repeat (context budget, stop strings, stats, prefix-cache keys,
adapter bookkeeping, errors for bad parameters) lives once in :mod:`edgegemma.engine`.

The engine drives one sequence at a time::

    reused = backend.start(tokens, reuse=n, adapters=[(handle, 1.0)], sampling=params)
    while ...:
        token = backend.next_token()

``start`` makes ``tokens`` the backend's current sequence. The engine promises that the
first ``reuse`` of them equal what the previous sequence evaluated under the same adapter
set; the backend may keep that much of its KV cache (or less, or none, when it cannot
rewind) and returns how many it kept. ``next_token`` samples the next token and appends it
to the sequence; evaluating it is the backend's business (llama.cpp and ONNX Runtime GenAI
evaluate lazily on the following call, LiteRT-LM inside its own decode loop).

A backend whose features say ``batch`` also runs several sequences together: it scores
prompts with :meth:`Backend.score_many`, and :meth:`Backend.batch` gives one
:class:`BatchedSequence` per prompt, each driven like the backend itself (``start``, then
``next_token``) while the backend evaluates all their pending tokens in one pass; one whose
features say ``batch_join`` takes more sequences into a running batch (:meth:`Backend.join`).

What a backend supports beyond that is declared on its class as :class:`Features` and
checked once by the engine, before a call touches the KV cache; a backend never rejects a
parameter by hand. Backends register in :mod:`edgegemma.backends`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from ..sampling import OPTIONAL_SAMPLING, SamplingParams

AdapterHandle = Any
"""Whatever a backend returns from :meth:`Backend.load_adapter`; only that backend reads it."""
TokenMask = np.ndarray
"""Allowed tokens as packed bits: int32 words, token ``t`` allowed when bit ``t % 32`` of word
``t // 32`` is set (llguidance's bitmask layout)."""


@dataclass(frozen=True)
class ModelInfo:
    """Facts about the loaded model that the engine's policy needs."""

    architecture: str
    n_ctx: int
    """Tokens the engine may keep in the context window (prompt plus generated)."""
    n_ctx_train: int
    vocab_size: int
    bos_id: int | None
    """Token the engine prepends to text prompts, or None when the model takes none."""
    eog_ids: frozenset[int]
    """Tokens that end generation (end of sequence, end of turn)."""
    can_shift: bool
    """Whether :meth:`Backend.shift` works (``on_overflow="shift"``)."""
    exact_reuse: bool = False
    """Whether a prompt evaluated after a reused KV prefix gets bit-identically the logits of a
    fresh evaluation (the runtime's kernels do not depend on how the prompt was batched)."""
    exact_reuse_with_adapters: bool = False
    """The same, with LoRA adapters attached."""
    description: str = ""
    chat_template: str | None = None
    """The model file's own chat template (Jinja), or None when it carries none."""


@dataclass(frozen=True)
class Features:
    """What a backend supports beyond the interface every backend implements."""

    options: frozenset[str] = frozenset()
    """Backend-specific load options it takes (``edgegemma.load(..., **options)``)."""
    sampling: frozenset[str] = field(default_factory=lambda: frozenset(OPTIONAL_SAMPLING))
    """The optional sampling controls it honours (see :data:`~edgegemma.sampling.OPTIONAL_SAMPLING`)."""
    score: bool = False
    """:meth:`Backend.score` works: classification and perplexity."""
    batch: int = 0
    """How many sequences :meth:`Backend.score_many` and :meth:`Backend.batch` evaluate in one
    pass of the model (0: they do not work)."""
    batch_min: int = 2
    """The fewest sequences worth evaluating together; fewer run one by one (per runtime:
    below this a batch is no faster, docs/performance.md)."""
    batch_join: bool = False
    """:meth:`Backend.join` works: a running batch takes another sequence between two passes."""
    batch_same_length: bool = False
    """The sequences of one batch need prompts of the same length (the runtime cannot pad)."""
    logits: bool = False
    """The runtime's logits are visible: :meth:`Backend.next_token` takes a token mask
    (constrained output) and :meth:`Backend.logits` gives the distribution (log-probabilities)."""
    adjustable_threads: bool = False
    """:meth:`Backend.set_threads` works: the engine then follows the free cores per call."""


N_CTX_STEP = 256
"""llama.cpp pads its context to a multiple of this; every backend is given the same window."""


def round_n_ctx(n: int) -> int:
    """``n`` tokens of context rounded up to a multiple of :data:`N_CTX_STEP`."""
    return -(-n // N_CTX_STEP) * N_CTX_STEP


@dataclass(frozen=True)
class BackendOptions:
    """Load-time settings every backend understands."""

    n_ctx: int
    n_threads: int
    extra: dict[str, Any]
    """Backend-specific options passed through ``edgegemma.load(..., **options)``."""


class Backend(ABC):
    """One runtime behind the engine. Not thread-safe: the engine serializes calls."""

    name: ClassVar[str]
    model_suffixes: ClassVar[tuple[str, ...]] = ()
    """File suffixes this backend opens; used to pick a backend for a path."""

    features: ClassVar[Features] = Features()

    info: ModelInfo

    @classmethod
    def accepts(cls, path: Path) -> bool:
        """Whether ``path`` looks like a model this backend opens (by default: its suffix)."""
        return path.suffix.lower() in cls.model_suffixes

    @classmethod
    @abstractmethod
    def open(cls, path: Path, options: BackendOptions) -> Backend:
        """Load the model at ``path``; raise :class:`~edgegemma.errors.ModelError` if unusable."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS; special-token text such as ``<eos>`` is parsed."""

    @abstractmethod
    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for (may be part of a UTF-8 character)."""

    @abstractmethod
    def load_adapter(self, path: Path) -> AdapterHandle:
        """Load a LoRA adapter; raise :class:`~edgegemma.errors.AdapterError` with the reason."""

    @abstractmethod
    def free_adapter(self, handle: AdapterHandle) -> None:
        """Release an adapter; detach it first if the current sequence uses it."""

    @abstractmethod
    def start(
        self,
        tokens: Sequence[int],
        *,
        reuse: int,
        adapters: Sequence[tuple[AdapterHandle, float]],
        sampling: SamplingParams,
    ) -> int:
        """Begin a sequence: evaluate ``tokens`` after the reusable prefix; return tokens reused."""

    @abstractmethod
    def next_token(self, mask: TokenMask | None = None) -> int:
        """Sample the next token of the current sequence and append it.

        ``mask`` (only given when ``features.logits``): the tokens allowed, a packed bit array
        of int32 words (token ``t`` is allowed when bit ``t % 32`` of word ``t // 32`` is set);
        the others get no probability.
        """

    def logits(self) -> np.ndarray:
        """The logits the last token was chosen from (a vocabulary-sized float32 view, masked
        where a mask was given). Only called when ``features.logits`` is true."""
        raise NotImplementedError(f"{self.name} does not show its logits")

    def score(
        self,
        prompt: Sequence[int],
        continuations: Sequence[Sequence[int]],
        *,
        reuse: int,
        adapters: Sequence[tuple[AdapterHandle, float]],
    ) -> list[float]:
        """The log-probability (natural log) of each continuation after ``prompt``: the sum
        over its tokens, each given the prompt and the continuation's tokens before it.

        ``prompt`` is evaluated as :meth:`start` does (``reuse`` means the same); continuations
        branch from it. Afterwards the backend's sequence is ``prompt`` (or none, for a runtime
        that keeps no KV cache between calls). Only called when ``features.score`` is true.
        """
        raise NotImplementedError(f"{self.name} cannot score token sequences")

    def score_many(
        self,
        prompts: Sequence[Sequence[int]],
        continuations: Sequence[Sequence[int]],
        *,
        adapters: Sequence[tuple[AdapterHandle, float]],
    ) -> list[list[float]]:
        """:meth:`score` of the same continuations after each prompt, the prompts evaluated
        together as separate sequences (all of one length where ``features.batch_same_length``).
        Afterwards the backend holds no sequence. Only called when ``features.batch`` is true."""
        raise NotImplementedError(f"{self.name} cannot score several sequences together")

    def batch(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_tokens: int,
        adapters: Sequence[tuple[AdapterHandle, float]],
        sampling: SamplingParams,
    ) -> list[BatchedSequence]:
        """One sequence per prompt, all evaluated together; the backend's own sequence is
        gone. No sequence generates more than ``max_tokens``; the prompts' tokens and the
        tokens each sequence generates fit ``n_ctx`` together. Only called when
        ``features.batch`` is true."""
        raise NotImplementedError(f"{self.name} cannot run several sequences together")

    def join(self, prompt: Sequence[int], *, max_tokens: int) -> BatchedSequence:
        """Add a sequence for ``prompt`` to the batch :meth:`batch` made last, between two of
        its passes (every sequence has taken its token of the last pass, or finished: even
        all of them); it is evaluated from the next pass on. The engine keeps the batch within ``features.batch`` sequences
        and ``n_ctx`` cells. Only called when ``features.batch_join`` is true."""
        raise NotImplementedError(f"{self.name} cannot add a sequence to a running batch")

    def shift(self, keep: int, discard: int) -> None:
        """Drop ``discard`` cached tokens after the first ``keep`` and close the gap.

        Only called when ``info.can_shift`` is true.
        """
        raise NotImplementedError(f"{self.name} cannot shift its context")

    def set_threads(self, n_threads: int) -> None:
        """Evaluate the next tokens on ``n_threads`` threads. Only called when
        ``features.adjustable_threads`` is true."""
        raise NotImplementedError(f"{self.name} cannot change its thread count")

    def runtime_stats(self) -> dict[str, float]:
        """The runtime's own measurements of the current sequence, where it keeps any."""
        return {}

    @abstractmethod
    def close(self) -> None:
        """Free the native model, context and adapters. Called once."""


class BatchedSequence(ABC):
    """One sequence of :meth:`Backend.batch`, driven as the backend drives its own."""

    @abstractmethod
    def start(
        self,
        tokens: Sequence[int],
        *,
        reuse: int,
        adapters: Sequence[tuple[AdapterHandle, float]],
        sampling: SamplingParams,
    ) -> int:
        """Accept ``tokens`` (the prompt this sequence was made for); reuses nothing."""

    @abstractmethod
    def next_token(self, mask: TokenMask | None = None) -> int:
        """As :meth:`Backend.next_token`; evaluates every sequence's pending tokens at once."""

    @abstractmethod
    def logits(self) -> np.ndarray:
        """As :meth:`Backend.logits`, for this sequence."""

    @abstractmethod
    def finish(self) -> None:
        """This sequence is done: it is evaluated no further and its cache cells are freed.
        A second call does nothing."""


class LockstepBatch(Protocol):
    """What a backend's batch object does for its rows (see :class:`BatchRow`)."""

    chosen_from: dict[int, np.ndarray]
    """Row -> the logits its last token was chosen from (valid until the next pass)."""

    def sample(self, row: int, mask: TokenMask | None) -> int:
        """``row``'s next token, from its newest logits (running the round's pass first)."""
        ...

    def finish(self, row: int) -> None:
        """``row`` is done: evaluate it no further."""
        ...


class BatchRow(BatchedSequence):
    """A sequence that is one row of a backend's batch; the batch does the work."""

    def __init__(self, batch: LockstepBatch, row: int):
        self._batch = batch
        self._row = row

    def start(
        self,
        tokens: Sequence[int],
        *,
        reuse: int,
        adapters: Sequence[tuple[AdapterHandle, float]],
        sampling: SamplingParams,
    ) -> int:
        return 0  # the prompt was given to Backend.batch(); it is evaluated with the others

    def next_token(self, mask: TokenMask | None = None) -> int:
        return self._batch.sample(self._row, mask)

    def logits(self) -> np.ndarray:
        return self._batch.chosen_from[self._row]

    def finish(self) -> None:
        self._batch.finish(self._row)


def apply_mask(logits: np.ndarray, mask: TokenMask) -> None:
    """Give the tokens ``mask`` does not allow no probability (``-inf``), in place."""
    allowed = np.unpackbits(mask.view(np.uint8), bitorder="little")[: logits.size]
    logits[allowed == 0] = -np.inf


def log_probs(logits: np.ndarray) -> np.ndarray:
    """Log-softmax of a vocabulary-sized vector, in float64 (float32 loses the small
    probabilities of a 262k vocabulary)."""
    values = logits.astype(np.float64)
    top = values.max()
    return values - top - np.log(np.exp(values - top).sum())


def target_log_probs(logits: np.ndarray, targets: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """``log_softmax(logits[i])[targets[i]]`` for each row, in float64.

    Only the normaliser is computed over the vocabulary (exp in float32, summed in float64):
    a full float64 log-softmax of a 262k-token vocabulary would cost more than the model's
    own pass.
    """
    found = []
    for row, wanted in zip(logits, targets):
        # Row by row: the temporary is one row (1 MiB for Gemma 3), not the whole batch.
        top = float(row.max())
        log_norm = math.log(float(np.exp(row - top).sum(dtype=np.float64))) + top
        found.append(row[list(wanted)].astype(np.float64) - log_norm)
    return found
