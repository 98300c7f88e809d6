"""The Engine: one API over every backend, and the policy they all share.

Context budget, stop strings, statistics, the prefix-cache key, adapter bookkeeping and
parameter checks are written here once; backends (see :mod:`edgegemma.backends`) only
evaluate tokens.
"""

from __future__ import annotations

import codecs
import contextlib
import itertools
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, Self, TypedDict, TypeVar, Unpack

import numpy as np

from .backends import backend_for_path, get_backend
from .backends.base import (
    AdapterHandle,
    Backend,
    BackendOptions,
    BatchedSequence,
    Features,
    ModelInfo,
    log_probs,
)
from .chat import (
    ChatTemplate,
    Message,
    check_messages,
    droppable_turns,
    gemma_template,
    without_turns,
)
from .constraints import Constraint, Matcher, Vocabulary, make_constraint
from .errors import (
    AdapterError,
    BackendUnavailableError,
    ContextOverflowError,
    EdgeGemmaError,
    EngineBusyError,
    EngineClosedError,
    InvalidParameterError,
    NumericalError,
    TimedOutError,
)
from .families import FAMILIES, require
from .memory import peak_rss_mb
from .sampling import OPTIONAL_SAMPLING, SamplingParams, check_float32
from .threads import ThreadPolicy, default_threads, usable_cores

_T = TypeVar("_T")
log = logging.getLogger("edgegemma")

OverflowPolicy = Literal["error", "truncate_left", "shift"]
OVERFLOW_POLICIES: tuple[str, ...] = ("error", "truncate_left", "shift")
PrefixCachePolicy = Literal["exact", "always"]
PREFIX_CACHE_POLICIES: tuple[str, ...] = ("exact", "always")
FinishReason = Literal["stop", "length", "cancelled", "timeout"]
N_CTX_STEP = 256
"""``n_ctx`` is rounded up to a multiple of this (llama.cpp pads its context so anyway)."""
GEMMA_BOS, GEMMA_EOS = "<bos>", "<eos>"
"""The special-token texts chat templates are rendered with (Gemma's vocabulary)."""
HELDOUT_TEXT = Path(__file__).with_name("data") / "heldout-en.txt"
"""An English text written for edgegemma (so no model has seen it) that the perplexity of a
model is measured on by default: 3084 tokens for Gemma 3, three windows of 1024."""


class _EngineAdapters:
    """Marker default for ``adapters=``: use the engine's own adapter set."""

    def __repr__(self) -> str:
        return "ENGINE_ADAPTERS"


ENGINE_ADAPTERS = _EngineAdapters()


class ChatOptions(TypedDict, total=False):
    """The options of :meth:`Engine.chat`: those of :meth:`Engine.generate` but ``keep``."""

    max_tokens: int | None
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repeat_penalty: float
    seed: int | None
    stop: Sequence[str]
    adapters: Mapping[str, float] | None | _EngineAdapters
    on_overflow: OverflowPolicy | None
    timeout: float | None
    choices: Sequence[str] | None
    regex: str | None
    json_schema: Mapping[str, Any] | str | None
    logprobs: int | None


@dataclass(frozen=True)
class Stats:
    """Counts and timings of one generation, measured the same way on every backend."""

    prompt_tokens: int
    """Prompt tokens in the context (after any truncation), BOS included."""
    cached_tokens: int
    """Prompt tokens reused from the KV cache instead of being evaluated."""
    completion_tokens: int
    truncated_tokens: int
    """Prompt tokens dropped by ``truncate_left`` plus cached tokens discarded by ``shift``."""
    ttft_s: float
    """Time from the call to the first generated token (tokenizing and prefill included)."""
    prefill_s: float
    decode_s: float
    total_s: float
    prefill_tps: float
    """Evaluated prompt tokens per second (cached tokens excluded)."""
    decode_tps: float
    """Generated tokens per second after the first one."""
    peak_rss_mb: float
    """High-water mark of this process's resident memory so far."""
    batch_size: int = 1
    """Sequences evaluated together with this one, itself included (:meth:`Engine.generate_many`,
    :meth:`Engine.run_together`; 1: alone)."""
    runtime: dict[str, float] = field(default_factory=dict)
    """The runtime's own figures, where it reports any (LiteRT-LM: ``init_s``,
    ``prefill_tokens``, ``prefill_tps`` and, for a generation it ended itself, ``ttft_s``,
    ``decode_tokens``, ``decode_tps``)."""


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability, and its most likely alternatives."""

    token: int
    text: str
    """The token's text (``\ufffd`` for part of a character)."""
    logprob: float
    """Natural log of its probability in the distribution it was chosen from."""
    top: list[TokenLogprob] = field(default_factory=list)
    """The ``logprobs=k`` most likely tokens at that step, most likely first."""


@dataclass(frozen=True)
class Result:
    """What :meth:`Engine.generate` returns."""

    text: str
    token_ids: list[int]
    """Generated tokens; the end-of-generation token is not included."""
    finish_reason: FinishReason
    finish_detail: str
    """Why generation ended, in words (which stop string, which limit)."""
    adapters: dict[str, float]
    """The adapter set the text was generated with (empty for the bare base model)."""
    stats: Stats
    logprobs: list[TokenLogprob] | None = None
    """Per generated token, with ``logprobs=k`` (backends that show their logits)."""


@dataclass(frozen=True)
class Classification:
    """What :meth:`Engine.classify` returns."""

    label: str
    """The most likely label."""
    scores: dict[str, float]
    """Each label's probability, normalised over the labels (they sum to 1)."""
    logprobs: dict[str, float]
    """Each label's log-probability after the prompt: the sum over its tokens."""
    prompt_tokens: int
    seconds: float
    adapters: dict[str, float]


@dataclass(frozen=True)
class Perplexity:
    """What :meth:`Engine.perplexity` returns."""

    perplexity: float
    """exp of the mean negative log-likelihood of the scored tokens: lower is better."""
    mean_nll: float
    """Mean negative log-likelihood per scored token, in nats."""
    tokens: int
    """Tokens scored (the second half of every window)."""
    windows: int
    window: int
    """Tokens per window, BOS included."""
    seconds: float


@dataclass(eq=False)
class _LoadedAdapter:
    uid: int
    name: str
    path: Path
    handle: AdapterHandle
    users: int = 0
    """Calls made with it that have not ended: it is freed only when none is left."""
    unloaded: bool = False


@dataclass
class _Request:
    prompt_ids: list[int]
    protected: int
    max_tokens: int | None
    sampling: SamplingParams
    stop: tuple[str, ...]
    adapters: dict[str, float]
    """The adapter set by name, as the call was made (for :attr:`Result.adapters`)."""
    bound: list[tuple[_LoadedAdapter, float]]
    """The loaded adapters those names meant when the call was made: what the call runs."""
    on_overflow: str
    timeout: float | None
    constraint: Constraint | None = None
    logprobs: int | None = None
    dropped: int = 0
    """Prompt tokens dropped before the request was made (old chat turns)."""
    started: float = field(default_factory=time.perf_counter)
    released: bool = False


class _Holder:
    """What holds the engine while a thread iterates it (a :class:`Stream`, a
    :class:`Together`): it takes the engine's lock on its first step and keeps it between
    steps, so that its own thread may still read the model there and another thread's
    ``close()`` ends it; it gives the lock back when it ends or is closed.

    Its steps and its closing take its mutex: a ``close()`` from another thread waits for
    the step running there (one token) instead of tearing the generation down beneath it,
    and the engine is given back only once that generation has stopped.
    """

    _holding_lock: bool = False
    thread: int | None = None
    """The thread iterating it now, or the last one that did: it, not the thread that made
    it, owns the engine while it runs."""
    running: bool = False
    """Whether a thread is inside ``next()`` (else it is paused between two steps)."""

    def __init__(self, engine: Engine):
        self._engine = engine
        self._mutex = threading.RLock()
        """Held while a step runs and while closing; a stream run by a :class:`Together`
        shares the Together's, since the Together's thread drives it."""
        self._closing = False
        """Set by ``close()`` before it waits: the step running elsewhere ends at its next
        token."""

    def _step(self, done: bool, step: Callable[[], _T]) -> _T:
        """``step()`` with the engine held (taken now unless held already or ``done``)."""
        self.thread = threading.get_ident()
        take = not self._holding_lock and not done
        if take:
            self._engine._acquire(self)
        with self._mutex:
            if take:
                self._holding_lock = True
            self.running = True
            try:
                return step()
            except BaseException:
                self._release()
                raise
            finally:
                self.running = False

    _pieces: Generator[Any, None, None]

    def close(self) -> None:
        """End it early (what is running is cancelled) and give the engine back. From
        another thread it waits for the token being computed there."""
        self._closing = True
        with self._mutex:
            try:
                self._pieces.close()
            finally:
                self._release()

    def _release(self) -> None:
        if self._holding_lock:
            self._holding_lock = False
            self._engine._release()
        self._engine._free_doomed_if_idle()


class Stream(_Holder, Iterator[str]):
    """Text pieces of one generation as they are produced.

    Iterate it; afterwards :attr:`result` holds the :class:`Result`. Breaking out of the loop
    and calling :meth:`close` (or leaving a ``with`` block) cancels the generation (its
    result's finish_reason is then ``"cancelled"``); the engine stays consistent for the next
    call.
    """

    def __init__(self, engine: Engine, request: _Request):
        super().__init__(engine)
        # The generator writes the Result here; holding no reference back to the Stream lets
        # an abandoned stream be freed (and its lock released) as soon as the loop drops it.
        self._outcome: list[Result] = []
        self._failure: list[EdgeGemmaError] = []
        """What ended it inside a :class:`Together`, where its own bad input (a constraint)
        ends it alone and the others run on."""
        self._request = request
        self._pieces: Generator[str, None, None] = engine._generate(request, self._outcome)

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> str:
        return self._step(bool(self._outcome), self._next_piece)

    def _next_piece(self) -> str:
        piece = next(self._pieces)
        while not piece:  # a token that completed no text (part of a character, or held back)
            if self._closing:  # closed from another thread, which waits for this step
                self._pieces.close()
                raise StopIteration
            piece = next(self._pieces)
        return piece

    @property
    def finished(self) -> bool:
        """Whether the generation has ended (:attr:`result` is there, or :attr:`error`)."""
        return bool(self._outcome or self._failure)

    @property
    def error(self) -> EdgeGemmaError | None:
        """The error that ended it in a :func:`~Engine.run_together` (its :attr:`result`
        raises it), or None."""
        return self._failure[0] if self._failure else None

    @property
    def result(self) -> Result:
        if self._failure:
            raise self._failure[0]
        if not self._outcome:
            raise EdgeGemmaError("the stream has not finished; iterate it to the end first")
        return self._outcome[0]

    def _release(self) -> None:
        self._engine._unbind(self._request)  # a stream never started still held its adapters
        super()._release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if self._holding_lock:
            self.close()
        else:
            self._engine._unbind(self._request)
            self._engine._free_doomed_if_idle()


class Engine:
    """A loaded base model on one backend, with LoRA adapters swapped at runtime.

    Create it with :func:`edgegemma.load`. Calls from several threads are serialized: one
    generation runs at a time. With ``prefix_cache="exact"`` (the default) a call's answer does
    not depend on earlier calls: a cached prompt prefix is reused only where the runtime
    computes it bit-identically to a fresh evaluation; ``"always"`` reuses it everywhere.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        model_path: Path,
        on_overflow: str = "error",
        prefix_cache: str = "exact",
        threads: ThreadPolicy | None = None,
    ):
        _check_policy(on_overflow)
        _check_prefix_cache(prefix_cache)
        self._backend = backend
        self.model_path = model_path
        # None: the backend keeps the thread count it was opened with.
        self._threads = (
            threads if threads is not None and backend.features.adjustable_threads else None
        )
        self._n_threads = self._threads.limit if self._threads is not None else 0
        self.on_overflow = on_overflow
        self.prefix_cache = prefix_cache
        self._adapters: dict[str, _LoadedAdapter] = {}
        self._active: dict[str, float] = {}
        self._adapter_ids = itertools.count(1)
        # What the backend's KV cache holds: a token prefix and the adapter set it was
        # computed under. Reuse is allowed only under the very same set.
        self._cached_tokens: list[int] = []
        self._cached_key: tuple[tuple[int, float], ...] = ()
        # How many of them were evaluated as a prompt. Generated tokens were evaluated one at
        # a time, and a runtime's one-row kernels round differently from its batched ones
        # (llama.cpp's repacked matmuls do): a fresh evaluation of the same text, batched,
        # gets other keys and values for them, so "exact" does not reuse them.
        self._cached_prompt = 0
        self._lock = threading.Lock()
        """Held by every generation and every change of the backend: one at a time."""
        self._state = threading.Lock()
        """Guards the adapter registry, the holder and a pending close (short sections only)."""
        self._holder: weakref.ReferenceType[_Holder] | None = None
        self._doomed: list[_LoadedAdapter] = []
        """Unloaded adapters whose last call has ended: freed by the next holder of the lock."""
        self._close_pending = False
        self._closed = False
        self._vocab: Vocabulary | None = None
        self._chat_template: ChatTemplate | None = None

    # -- model facts ---------------------------------------------------------------------

    @property
    def backend_name(self) -> str:
        return self._backend.name

    @property
    def info(self) -> ModelInfo:
        return self._backend.info

    @property
    def features(self) -> Features:
        """What the backend supports beyond generating: classify and perplexity (``score``),
        constrained output and logprobs (``logits``), its load options."""
        return self._backend.features

    @property
    def n_ctx(self) -> int:
        """Tokens of context (prompt plus generated) this engine holds."""
        return self._backend.info.n_ctx

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Token ids of ``text`` as the engine feeds them to the model."""
        checked = _check_text(text)
        with self._reading():
            ids = self._backend.tokenize(checked)
        bos = self._backend.info.bos_id
        return [bos, *ids] if add_bos and bos is not None else ids

    def detokenize(self, token_ids: Sequence[int]) -> str:
        with self._reading():
            data = b"".join(self._backend.token_bytes(t) for t in self._check_ids(token_ids))
        return data.decode("utf-8", errors="replace")

    # -- adapters ------------------------------------------------------------------------

    @property
    def adapters(self) -> dict[str, Path]:
        """Loaded adapters by name."""
        return {name: a.path for name, a in self._adapters.items()}

    @property
    def active_adapters(self) -> dict[str, float]:
        """The engine's adapter set: used by every call that does not pass ``adapters=``."""
        return dict(self._active)

    def load_adapter(self, name: str, path: str | os.PathLike[str]) -> None:
        """Load a LoRA adapter file under ``name``; the base model is not reloaded."""
        if not isinstance(name, str) or not name:
            raise InvalidParameterError(f"adapter name must be a non-empty string, got {name!r}")
        if not isinstance(path, (str, os.PathLike)) or path == "":
            raise InvalidParameterError(f"adapter path must be a file path, got {path!r}")
        adapter_path = Path(path)
        with self._exclusive():
            self._free_doomed()
            if name in self._adapters:
                raise AdapterError(f"an adapter named {name!r} is already loaded; unload it first")
            if not adapter_path.is_file():
                raise AdapterError(f"adapter file not found: {adapter_path}")
            handle = self._backend.load_adapter(adapter_path)
            with self._state:
                self._adapters[name] = _LoadedAdapter(
                    next(self._adapter_ids), name, adapter_path, handle
                )
        log.debug("loaded adapter %s from %s", name, adapter_path)

    def unload_adapter(self, name: str) -> None:
        """Remove an adapter. It must not be in the engine's active set.

        The name is free at once: later calls cannot use it, and another adapter may be loaded
        under it. Calls already made with the adapter (a stream not yet finished, a call
        waiting for the engine) still run with it; its memory is freed when the last of them
        ends.
        """
        with self._exclusive():
            with self._state:
                loaded = self._adapters.get(name)
                if loaded is None:
                    raise AdapterError(f"no adapter named {name!r} is loaded")
                if name in self._active:
                    raise AdapterError(
                        f"adapter {name!r} is in the active set {self._active}; "
                        "call set_adapters() without it first"
                    )
                del self._adapters[name]
                loaded.unloaded = True
                if loaded.users == 0:
                    self._doomed.append(loaded)
            self._free_doomed()

    def set_adapters(self, adapters: Mapping[str, float] | None) -> None:
        """Make ``{name: scale}`` the engine's adapter set; ``None`` or ``{}`` is the bare base."""
        checked = self._check_adapter_set(adapters)
        with self._exclusive():
            self._active = checked

    # -- generation ----------------------------------------------------------------------

    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int | None = 256,
        temperature: float = 0.0,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.0,
        repeat_penalty: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        adapters: Mapping[str, float] | None | _EngineAdapters = ENGINE_ADAPTERS,
        on_overflow: OverflowPolicy | None = None,
        keep: int | str = 0,
        timeout: float | None = None,
        choices: Sequence[str] | None = None,
        regex: str | None = None,
        json_schema: Mapping[str, Any] | str | None = None,
        logprobs: int | None = None,
    ) -> Result:
        """Generate a continuation of ``prompt`` (text, or token ids taken as they are).

        ``max_tokens=None`` generates until an end token or a full context window.
        ``adapters`` overrides the engine's adapter set for this call only.
        ``on_overflow`` overrides the engine's context policy; ``keep`` is the protected
        prompt prefix (a token count, or a string the prompt starts with) that
        ``truncate_left`` and ``shift`` never drop. ``timeout`` (seconds, from this call) ends
        generation early with finish_reason ``"timeout"``; the text so far is returned.

        ``choices``, ``regex`` or ``json_schema`` (one of them) constrain the output: only
        tokens that keep it a prefix of a valid answer are ever chosen, and it ends when the
        answer is complete (finish_reason ``"stop"``); one that could not be completed within
        ``max_tokens`` ends with finish_reason ``"length"`` and says so in ``finish_detail``.
        ``logprobs=k`` records each generated token's log-probability and the ``k`` most likely
        alternatives in ``Result.logprobs``. Both need a backend that shows its logits
        (llamacpp, onnx).
        """
        stream = self.stream(
            prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repeat_penalty=repeat_penalty,
            seed=seed,
            stop=stop,
            adapters=adapters,
            on_overflow=on_overflow,
            keep=keep,
            timeout=timeout,
            choices=choices,
            regex=regex,
            json_schema=json_schema,
            logprobs=logprobs,
        )
        with stream:
            for _ in stream:
                pass
        return stream.result

    def stream(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int | None = 256,
        temperature: float = 0.0,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.0,
        repeat_penalty: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        adapters: Mapping[str, float] | None | _EngineAdapters = ENGINE_ADAPTERS,
        on_overflow: OverflowPolicy | None = None,
        keep: int | str = 0,
        timeout: float | None = None,
        choices: Sequence[str] | None = None,
        regex: str | None = None,
        json_schema: Mapping[str, Any] | str | None = None,
        logprobs: int | None = None,
    ) -> Stream:
        """Like :meth:`generate`, but yields text pieces as they are produced."""
        self._check_open()
        sampling = SamplingParams(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repeat_penalty=repeat_penalty,
            seed=seed,
        )
        if max_tokens is not None and (
            isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0
        ):
            raise InvalidParameterError(
                f"max_tokens must be a non-negative integer or None, got {max_tokens!r}"
            )
        policy = self.on_overflow if on_overflow is None else on_overflow
        _check_policy(policy)
        if policy == "shift" and max_tokens is None:
            raise InvalidParameterError('on_overflow="shift" needs a finite max_tokens')
        unsupported = sampling.optional_in_use() - self._backend.features.sampling
        if unsupported:
            raise InvalidParameterError(
                f"the {self.backend_name} backend has no {' or '.join(sorted(unsupported))}; "
                f"leave {', '.join(f'{n}={OPTIONAL_SAMPLING[n]}' for n in sorted(unsupported))}"
            )
        if policy == "shift" and not self.info.can_shift:
            raise InvalidParameterError(
                f"the {self.backend_name} backend cannot shift its context; "
                'use on_overflow="truncate_left" or "error"'
            )
        stops = _check_stop(stop)
        _check_timeout(timeout)
        constraint = make_constraint(choices, regex, json_schema)
        if logprobs is not None and (
            isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= 20
        ):
            raise InvalidParameterError(f"logprobs must be an integer in [0, 20], got {logprobs!r}")
        if (constraint is not None or logprobs is not None) and not self._backend.features.logits:
            what = "constrained output" if constraint is not None else "logprobs"
            raise BackendUnavailableError(
                f"the {self.backend_name} backend shows no logits, so it has no {what} "
                "(it is available on llamacpp and onnx)"
            )
        active = self._active if adapters is ENGINE_ADAPTERS else self._check_adapter_set(adapters)
        prompt_ids = self._prompt_ids(prompt)
        protected = self._protected_length(prompt, prompt_ids, keep)
        request = _Request(
            prompt_ids=prompt_ids,
            protected=protected,
            max_tokens=max_tokens,
            sampling=sampling,
            stop=stops,
            adapters=dict(active),
            bound=[],
            on_overflow=policy,
            timeout=timeout,
            constraint=constraint,
            logprobs=logprobs,
        )
        # A request that cannot fit the context fails here, alone, rather than in the middle of
        # run_together with others.
        self._fit_context(request, self.n_ctx)
        request.bound = self._bind(active)
        return Stream(self, request)

    def perplexity(
        self,
        text: str,
        *,
        window: int = 1024,
        adapters: Mapping[str, float] | None | _EngineAdapters = ENGINE_ADAPTERS,
    ) -> Perplexity:
        """The model's perplexity on ``text``, the way llama.cpp's perplexity tool measures it.

        The text's tokens are cut into windows of ``window`` tokens (BOS first); in each, the
        tokens of the second half are scored given every token before them in the window. A
        text shorter than one window is scored as one shorter window.
        """
        self._check_open()
        if not self._backend.features.score:
            raise BackendUnavailableError(
                f"the {self.backend_name} backend cannot score tokens, so it has no perplexity"
            )
        if (
            isinstance(window, bool)
            or not isinstance(window, int)
            or not 16 <= window <= self.n_ctx
        ):
            raise InvalidParameterError(
                f"window must be an integer in [16, n_ctx={self.n_ctx}], got {window!r}"
            )
        active = self._active if adapters is ENGINE_ADAPTERS else self._check_adapter_set(adapters)
        ids = self.tokenize(text, add_bos=False)
        started = time.perf_counter()
        bos = [] if self.info.bos_id is None else [self.info.bos_id]
        step = window - len(bos)
        chunks = [ids[i : i + step] for i in range(0, len(ids) - step + 1, step)] or [ids]
        if len(bos) + len(chunks[0]) < 4:
            raise InvalidParameterError(
                f"the text has {len(ids)} tokens; perplexity needs at least {4 - len(bos)}"
            )
        total, count = 0.0, 0
        bound = self._bind(active)
        try:
            for chunk in chunks:
                tokens = [*bos, *chunk]
                half = len(tokens) // 2
                [score] = self._score(tokens[:half], [tokens[half:]], bound)
                total -= score
                count += len(tokens) - half
        finally:
            self._unbind_all(bound)
        if not math.isfinite(total):
            raise NumericalError(
                f"the {self.backend_name} backend computed non-finite log-probabilities "
                "(NaN or infinite logits): check the adapter scales"
            )
        mean = total / count
        return Perplexity(
            perplexity=math.exp(mean),
            mean_nll=mean,
            tokens=count,
            windows=len(chunks),
            window=len(bos) + len(chunks[0]),
            seconds=time.perf_counter() - started,
        )

    def classify(
        self,
        prompt: str | Sequence[int],
        labels: Sequence[str],
        *,
        adapters: Mapping[str, float] | None | _EngineAdapters = ENGINE_ADAPTERS,
        timeout: float | None = None,
    ) -> Classification:
        """Which of ``labels`` the model says follows ``prompt``, with a probability for each.

        The prompt is evaluated once; each label's tokens are scored after it (a label of
        several tokens branches from the prompt's KV cache), so a question with three labels
        costs one prefill and a few tokens, not a generation. Labels are the text as it would
        follow the prompt, leading space included (``[" normal", " warning"]``). The
        probabilities are the labels' likelihoods normalised over the labels. With
        ``timeout`` (seconds, from this call) the labels are scored a few dozen at a time and
        a call past it raises :class:`~edgegemma.errors.TimedOutError` (scores over part of
        the labels would be a wrong answer, not a partial one).
        """
        self._check_open()
        if not self._backend.features.score:
            raise BackendUnavailableError(f"the {self.backend_name} backend cannot score labels")
        _check_timeout(timeout)
        label_ids = self._label_ids(labels)
        active = self._active if adapters is ENGINE_ADAPTERS else self._check_adapter_set(adapters)
        prompt_ids = self._classify_prompt_ids(prompt, label_ids)
        started = time.perf_counter()
        step = _LABELS_PER_TIMEOUT_CHECK if timeout is not None else len(label_ids)
        bound = self._bind(active)
        try:
            totals: list[float] = []
            for first in range(0, len(label_ids), step):
                if timeout is not None and time.perf_counter() - started > timeout:
                    raise TimedOutError(
                        f"classify took longer than {timeout} s: {first} of {len(label_ids)} "
                        "labels scored"
                    )
                totals += self._score(prompt_ids, label_ids[first : first + step], bound)
        finally:
            self._unbind_all(bound)
        return self._classification(
            labels, totals, len(prompt_ids), time.perf_counter() - started, active
        )

    def classify_many(
        self,
        prompts: Sequence[str | Sequence[int]],
        labels: Sequence[str],
        *,
        adapters: Mapping[str, float] | None | _EngineAdapters = ENGINE_ADAPTERS,
    ) -> list[Classification]:
        """:meth:`classify` for each prompt, under one adapter set.

        Where the backend evaluates several sequences together, the prompts run in batches:
        on llama.cpp their common prefix once, each prompt as its own sequence of one shared
        KV cache; on ONNX Runtime GenAI prompts of the same length together. LiteRT-LM runs
        them one after another. Each result's ``seconds`` is its share of the whole call.
        """
        batch = _check_batch(prompts)
        self._check_open()
        if not self._backend.features.score:
            raise BackendUnavailableError(f"the {self.backend_name} backend cannot score labels")
        label_ids = self._label_ids(labels)  # bad labels fail before any prompt runs
        active = self._active if adapters is ENGINE_ADAPTERS else self._check_adapter_set(adapters)
        if not self._backend.features.batch:
            return [self.classify(prompt, labels, adapters=active) for prompt in batch]
        prompt_ids = [self._classify_prompt_ids(prompt, label_ids) for prompt in batch]
        if not prompt_ids:
            return []
        longest = max(len(ids) for ids in label_ids)
        if self._backend.features.batch_same_length:
            groups = self._batch_groups([(len(ids), len(ids) + longest) for ids in prompt_ids])
        else:  # the backend groups them itself
            groups = [list(range(len(prompt_ids)))]
        totals: list[list[float]] = [[] for _ in prompt_ids]
        started = time.perf_counter()
        bound = self._bind(active)
        try:
            with self._exclusive():
                self._forget_cache()  # the batch leaves no sequence in the backend
                handles = [(loaded.handle, scale) for loaded, scale in bound]
                for group in groups:
                    found = self._scoring(
                        partial(
                            self._backend.score_many,
                            [prompt_ids[i] for i in group],
                            label_ids,
                            adapters=handles,
                        )
                    )
                    for i, values in zip(group, found):
                        totals[i] = values
        finally:
            self._unbind_all(bound)
        share = (time.perf_counter() - started) / len(prompt_ids)
        return [
            self._classification(labels, values, len(ids), share, active)
            for ids, values in zip(prompt_ids, totals)
        ]

    def _classify_prompt_ids(self, prompt: object, label_ids: list[list[int]]) -> list[int]:
        prompt_ids = self._prompt_ids(prompt)
        longest = max(len(ids) for ids in label_ids)
        if len(prompt_ids) + longest > self.n_ctx:
            raise ContextOverflowError(
                f"the prompt ({len(prompt_ids)} tokens) and the longest label ({longest}) exceed "
                f"the context window (n_ctx={self.n_ctx})",
                prompt_tokens=len(prompt_ids),
                max_tokens=longest,
                n_ctx=self.n_ctx,
            )
        return prompt_ids

    def _classification(
        self,
        labels: Sequence[str],
        totals: Sequence[float],
        prompt_tokens: int,
        seconds: float,
        active: Mapping[str, float],
    ) -> Classification:
        values = np.asarray(totals, dtype=np.float64)
        if not np.isfinite(values).all():
            raise NumericalError(
                f"the {self.backend_name} backend computed non-finite log-probabilities "
                "(NaN or infinite logits): check the adapter scales"
            )
        probabilities = np.exp(values - values.max())
        probabilities /= probabilities.sum()
        names = list(labels)
        return Classification(
            label=names[int(values.argmax())],
            scores={label: float(p) for label, p in zip(names, probabilities)},
            logprobs={label: float(v) for label, v in zip(names, values)},
            prompt_tokens=prompt_tokens,
            seconds=seconds,
            adapters=dict(active),
        )

    def generate_many(self, prompts: Sequence[str | Sequence[int]], **options: Any) -> list[Result]:
        """:meth:`generate` for each prompt with the same options.

        Where the backend evaluates several sequences together (llama.cpp, and ONNX Runtime
        GenAI for prompts of the same length), the prompts run as one batch, each pass of the
        model taking one token of each; as many go together as the backend holds and the
        context window fits (every prompt with its ``max_tokens``). Elsewhere they run one
        after another. Stop strings, constraints, logprobs, timeouts and stats apply to each
        sequence as to one call.
        """
        batch = _check_batch(prompts)
        streams = [self.stream(prompt, **options) for prompt in batch]
        for _ in self.run_together(streams):
            pass
        return [stream.result for stream in streams]

    def run_together(self, streams: Sequence[Stream], *, batch_min: int | None = None) -> Together:
        """Run streams made by :meth:`stream` or :meth:`stream_chat` (not yet iterated) as
        :meth:`generate_many` runs its prompts; iterate the returned :class:`Together` for
        ``(index, text)`` as the stream at ``index`` produces text. Afterwards each stream's
        ``result`` holds its Result; :meth:`Together.add` brings in more streams while they
        run.

        Streams with the same adapter set and sampling settings run together; the others
        one group after another, the group of the stream waiting longest first. Closing a
        stream between two pieces cancels it, the others go on (one not started yet never
        starts and has no result); closing the iterator cancels the streams running then (the
        streams not yet started are left without a result).
        The engine is held until the iterator is exhausted or closed.

        ``batch_min`` is the fewest streams of a kind that run as a batch; fewer run one by
        one. By default the backend's ``features.batch_min``, below which it measured a batch
        no faster; a caller that will :meth:`Together.add` streams (a server) may pass 1, so
        that a stream running alone is a batch that later ones can join.
        """
        if batch_min is not None and (
            isinstance(batch_min, bool) or not isinstance(batch_min, int) or batch_min < 1
        ):
            raise InvalidParameterError(f"batch_min must be a positive integer, got {batch_min!r}")
        return Together(self, streams, batch_min or self._backend.features.batch_min)

    def _run_together(self, together: Together) -> Generator[tuple[int, str], None, None]:
        """The pieces of ``together``'s streams; runs while ``together`` holds the engine."""
        try:
            while together._still_waiting():
                group = self._next_group(together)
                for index, piece in self._generate_together(together, group):
                    if piece:
                        yield index, piece
        finally:
            together._over = True
            for stream in list(together._streams.values()):
                stream.close()  # unbinds its adapters; a stream not yet finished is cancelled
            self._free_doomed()

    def _next_group(self, together: Together) -> list[int]:
        """Take from ``together``'s waiting streams the first batch the backend can evaluate
        together among those of the longest-waiting stream's adapter set and sampling."""
        waiting = together._waiting
        kind = _kind(together._streams[waiting[0]]._request)
        members = [i for i in waiting if _kind(together._streams[i]._request) == kind]
        fitted = together._fitted
        sizes = [(len(fitted[i][0]), len(fitted[i][0]) + fitted[i][2]) for i in members]
        group = [members[i] for i in self._batch_groups(sizes)[0]]
        together._waiting = [i for i in waiting if i not in group]
        return group

    def _batch_groups(self, sizes: list[tuple[int, int]]) -> list[list[int]]:
        """Indices of sequences, given as (prompt tokens, cells needed), in groups the backend
        can evaluate together: at most ``features.batch``, needing at most ``n_ctx`` cells in
        all, of one prompt length where the backend cannot pad. Indices keep their order
        within a group."""
        features = self._backend.features
        open_groups: dict[int, tuple[list[int], int]] = {}  # prompt length or 0 -> (group, cells)
        groups: list[list[int]] = []
        for index, (length, need) in enumerate(sizes):
            key = length if features.batch_same_length else 0
            group, cells = open_groups.get(key, ([], 0))
            if not group or len(group) >= features.batch or cells + need > self.n_ctx:
                group, cells = [], 0
                groups.append(group)
            group.append(index)
            open_groups[key] = (group, cells + need)
        return groups

    def _generate_together(self, together: Together, group: list[int]) -> Iterator[tuple[int, str]]:
        """Run the streams at ``group`` as one batch of the backend's sequences (a few: one by
        one), yielding ``(index, text)`` once per token of each. Between two passes, waiting
        streams of the same kind join the batch where the backend can grow one."""
        streams = together._streams
        backend = self._backend
        if not backend.features.batch or len(group) < together._batch_min:
            for index in group:
                try:
                    for piece in streams[index]._pieces:
                        yield index, piece
                except InvalidParameterError as exc:  # its own input: it alone ends
                    streams[index]._failure.append(exc)
                together._forget(index)
            return
        request = streams[group[0]]._request
        kind = _kind(request)
        handles = [(loaded.handle, scale) for loaded, scale in request.bound]
        fitted = together._fitted
        self._forget_cache()  # the batch replaces the backend's own sequence
        sequences = backend.batch(
            [fitted[i][0] for i in group],
            max_tokens=max(fitted[i][2] for i in group),
            adapters=handles,
            sampling=request.sampling,
        )
        running: dict[int, BatchedSequence] = {}
        for index, sequence in zip(group, sequences):
            self._drive(streams[index], sequence, len(group))
            running[index] = sequence
        try:
            while running:  # one token of each sequence per round: one pass of the model
                if backend.features.batch_join:
                    self._join(together, kind, running)
                for index, sequence in list(running.items()):
                    try:
                        piece = next(streams[index]._pieces)
                    except (StopIteration, InvalidParameterError) as ended:
                        # Finished, closed, or failed on its own input (a constraint with no
                        # way forward): it leaves the batch, the others run on.
                        if isinstance(ended, InvalidParameterError):
                            streams[index]._failure.append(ended)
                        sequence.finish()
                        del running[index]
                        together._forget(index)
                        continue
                    yield index, piece
        finally:
            for index, sequence in running.items():
                streams[index]._pieces.close()
                sequence.finish()
            self._forget_cache()  # each sequence recorded its tokens as the cache's

    def _join(self, together: Together, kind: object, running: dict[int, BatchedSequence]) -> None:
        """Between two passes: add to the batch the waiting streams of its kind that fit, in
        the order they came, while it has rows free."""
        fitted = together._fitted
        cells = sum(len(fitted[i][0]) + fitted[i][2] for i in running)
        for index in together._still_waiting():
            if len(running) >= self._backend.features.batch:
                break
            tokens, _, limit, _ = fitted[index]
            if (
                _kind(together._streams[index]._request) != kind
                or cells + len(tokens) + limit > self.n_ctx
            ):
                continue
            sequence = self._backend.join(tokens, max_tokens=limit)
            together._waiting.remove(index)
            cells += len(tokens) + limit
            running[index] = sequence
            self._drive(together._streams[index], sequence, len(running))

    def _drive(self, stream: Stream, sequence: BatchedSequence, batch_size: int) -> None:
        # The stream's generation now drives its sequence of the batch (the generator it had
        # was never started); closing the stream closes this one.
        stream._pieces = self._generate(stream._request, stream._outcome, sequence, batch_size)

    def _label_ids(self, labels: object) -> list[list[int]]:
        if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence) or not labels:
            raise InvalidParameterError(
                f"labels must be a non-empty list of strings, got {labels!r}"
            )
        if not all(isinstance(label, str) for label in labels):
            raise InvalidParameterError("every label must be a string")
        if len(set(labels)) != len(labels):
            raise InvalidParameterError(f"labels must be distinct, got {list(labels)!r}")
        ids = [self.tokenize(label, add_bos=False) for label in labels]
        empty = [label for label, found in zip(labels, ids) if not found]
        if empty:
            raise InvalidParameterError(f"labels {empty!r} stand for no tokens")
        return ids

    def _vocabulary(self) -> Vocabulary:
        """The backend's vocabulary for constraints, built on first use (the lock is held)."""
        if self._vocab is None:
            info = self._backend.info
            self._vocab = Vocabulary(
                self._backend.token_bytes,
                self._backend.tokenize,
                vocab_size=info.vocab_size,
                bos_id=info.bos_id,
                eog_ids=info.eog_ids,
            )
        return self._vocab

    def _logprob(self, logits: np.ndarray, token: int, top: int) -> TokenLogprob:
        values = log_probs(logits)
        best = np.argpartition(-values, top)[:top] if top else np.array([], dtype=np.int64)
        best = best[np.argsort(-values[best], kind="stable")]
        return TokenLogprob(
            token=token,
            text=self._backend.token_bytes(token).decode("utf-8", "replace"),
            logprob=float(values[token]),
            top=[
                TokenLogprob(
                    int(t),
                    self._backend.token_bytes(int(t)).decode("utf-8", "replace"),
                    float(values[t]),
                )
                for t in best
            ],
        )

    def _score(
        self,
        prompt: list[int],
        continuations: list[list[int]],
        bound: list[tuple[_LoadedAdapter, float]],
    ) -> list[float]:
        """The log-probability of each continuation after ``prompt`` (see Backend.score)."""
        with self._exclusive():
            key = _adapter_key(bound)
            handles = [(loaded.handle, scale) for loaded, scale in bound]
            reuse = self._reusable(prompt, key, with_adapters=bool(handles))
            self._forget_cache()
            scores = self._scoring(
                lambda: self._backend.score(prompt, continuations, reuse=reuse, adapters=handles)
            )
            self._cached_tokens = list(prompt)
            self._cached_prompt = len(prompt)
            self._cached_key = key
            return scores

    def _scoring(self, call: Callable[[], _T]) -> _T:
        """``call()``, with a runtime's own exceptions reported as edgegemma errors."""
        try:
            return call()
        except EdgeGemmaError:
            raise
        except Exception as exc:
            raise EdgeGemmaError(
                f"{self.backend_name} backend failed while scoring: {exc}"
            ) from exc

    # -- chat ----------------------------------------------------------------------------

    @property
    def chat_template(self) -> ChatTemplate:
        """The chat template :meth:`chat` renders messages with: the model file's own, else
        Gemma 3's where the model's family chats in Gemma 3's turns (:mod:`.families`)."""
        if self._chat_template is None:
            own = self.info.chat_template
            if own is None and self.info.architecture in FAMILIES:
                require(self.info.architecture, "chat-template")
            self._chat_template = ChatTemplate(
                own if own is not None else gemma_template(),
                bos_token=GEMMA_BOS,
                eos_token=GEMMA_EOS,
                builtin=own is None,
            )
        return self._chat_template

    def apply_chat_template(self, messages: Sequence[Message]) -> str:
        """The prompt text :meth:`chat` gives the model for ``messages`` (the model's turn
        opened, ready for its answer)."""
        return self.chat_template.render(check_messages(messages))

    def chat(self, messages: Sequence[Message], **options: Unpack[ChatOptions]) -> Result:
        """The model's answer to a conversation: ``[{"role": "system" | "user" |
        "assistant", "content": ...}, ...]``, ending with the user's message.

        The messages are rendered with :attr:`chat_template`; generation stops at the end of
        the model's turn. Options are those of :meth:`generate`. When the conversation does not
        fit the context, ``on_overflow="truncate_left"`` drops whole turns, oldest first, and
        keeps the system message; ``"shift"`` never discards the system message either.
        """
        stream = self.stream_chat(messages, **options)
        with stream:
            for _ in stream:
                pass
        return stream.result

    def stream_chat(self, messages: Sequence[Message], **options: Unpack[ChatOptions]) -> Stream:
        """Like :meth:`chat`, but yields text pieces as they are produced."""
        self._check_open()
        if "keep" in options:
            raise InvalidParameterError(
                "chat takes no keep=: the system message is what the context policy protects"
            )
        conversation = check_messages(messages)
        policy = options.get("on_overflow") or self.on_overflow
        _check_policy(policy)
        max_tokens = options.get("max_tokens", 256)
        ids = self._chat_ids(conversation)
        dropped = 0
        if policy == "truncate_left" and isinstance(max_tokens, (int, type(None))):
            budget = self.n_ctx - (max_tokens if max_tokens is not None else 1)
            if len(ids) > budget:
                full = len(ids)
                ids = self._fewest_dropped(conversation, budget) or ids
                if len(ids) > budget:
                    raise ContextOverflowError(
                        f"the conversation does not fit the context window even with its old "
                        f"turns dropped: its last turn{' and the system message' if conversation[0]['role'] == 'system' else ''} "
                        f"take {len(ids)} tokens, max_tokens is {max_tokens}, n_ctx={self.n_ctx}. "
                        "Shorten the last message, lower max_tokens or load with a larger n_ctx.",
                        prompt_tokens=len(ids),
                        max_tokens=max_tokens,
                        n_ctx=self.n_ctx,
                    )
                dropped = full - len(ids)
            policy = "error"  # whole turns are dropped, never a part of one
        options["on_overflow"] = policy  # type: ignore[typeddict-item]  # checked above
        stream = self.stream(ids, **options, keep=self._system_prefix(conversation))
        stream._request.dropped = dropped
        return stream

    def _fewest_dropped(self, conversation: list[Message], budget: int) -> list[int] | None:
        """The prompt of ``conversation`` with the fewest old turns dropped that fits
        ``budget`` tokens, else with all droppable turns dropped (None if none can be).

        Dropping more turns never lengthens the prompt, so the count is found by bisection:
        a few renders of the template, not one per turn (1,600 turns took 48 s that way)."""
        counts = droppable_turns(conversation)
        if not counts:
            return None
        low, high = 0, len(counts) - 1
        best = self._chat_ids(without_turns(conversation, counts[high]))
        if len(best) > budget:
            return best
        while low < high:
            middle = (low + high) // 2
            ids = self._chat_ids(without_turns(conversation, counts[middle]))
            if len(ids) <= budget:
                best, high = ids, middle
            else:
                low = middle + 1
        return best

    def _chat_ids(self, conversation: list[Message]) -> list[int]:
        ids = self.tokenize(self.chat_template.render(conversation), add_bos=False)
        bos = self.info.bos_id
        if bos is not None and ids[:1] != [bos]:
            ids.insert(0, bos)  # a template that leaves BOS to the tokenizer
        return ids

    def _system_prefix(self, conversation: list[Message]) -> int:
        """Tokens of the rendered prompt up to the end of the system message (else BOS)."""
        if conversation[0]["role"] != "system":
            return 0
        # The prompts of two different first questions agree up to where the question starts.
        system = conversation[0]
        one = self._chat_ids([system, {"role": "user", "content": "1"}])
        two = self._chat_ids([system, {"role": "user", "content": "2"}])
        return _common_prefix(one, two)

    def reset(self) -> None:
        """Forget the KV cache; the next call evaluates its whole prompt."""
        with self._exclusive():
            self._forget_cache()

    # -- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        """Free the model and adapters. A generation running in another thread ends first.

        A stream paused between two pieces (its loop body running, or left unfinished) does
        not keep ``close`` waiting: the engine is freed when that stream ends or is closed,
        and iterating it again ends it with finish_reason ``"cancelled"``.
        """
        with self._state:
            if self._closed:
                return
            self._closed = True
        holder = self._holder() if self._holder is not None else None
        if holder is not None and holder.thread == threading.get_ident():
            holder.close()
        while not self._lock.acquire(timeout=0.05):
            with self._state:
                holder = self._holder() if self._holder is not None else None
                if holder is not None and not holder.running:
                    self._close_pending = True  # the holder's release closes the backend
                    return
        try:
            self._close_backend()
        finally:
            self._lock.release()

    def _close_backend(self) -> None:
        try:
            self._backend.close()
        finally:
            with self._state:
                self._adapters.clear()
                self._doomed.clear()
            self._forget_cache()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"n_ctx={self.n_ctx}"
        return f"<Engine {self.backend_name} {self.model_path.name} {state}>"

    # -- internals -----------------------------------------------------------------------

    def _generate(
        self,
        request: _Request,
        outcome: list[Result],
        sequence: BatchedSequence | None = None,
        batch_size: int = 1,
    ) -> Generator[str, None, None]:
        """Run ``request``, yielding once per generated token (its text, possibly empty), on
        the backend's own sequence or on one ``sequence`` of a batch of ``batch_size``."""
        backend = self._backend
        driver: Backend | BatchedSequence = sequence if sequence is not None else backend
        n_ctx = backend.info.n_ctx
        tokens, truncated, limit, limit_detail = self._fit_context(request, n_ctx)
        n_prompt = len(tokens)
        self._free_doomed()
        key = _adapter_key(request.bound)
        handles = [(loaded.handle, scale) for loaded, scale in request.bound]
        reuse = self._reusable(tokens, key, with_adapters=bool(handles))

        # Until start() returns, the backend's cache is in an unknown state.
        self._forget_cache()
        text = _TextAssembler(request.stop)
        generated: list[int] = []
        logprobs: list[TokenLogprob] = []
        finish: FinishReason = "length"
        detail = limit_detail
        first_token_at: float | None = None
        last_token_at: float | None = None
        deadline = request.started + request.timeout if request.timeout is not None else math.inf
        try:
            t_prefill = time.perf_counter()
            self._follow_free_cores()
            reused = driver.start(tokens, reuse=reuse, adapters=handles, sampling=request.sampling)
            prefill_s = time.perf_counter() - t_prefill
            self._cached_tokens = tokens  # the same list: it grows with the generated tokens
            self._cached_prompt = n_prompt
            self._cached_key = key
            matcher = (
                Matcher(request.constraint, self._vocabulary())
                if request.constraint is not None
                else None
            )
            while len(generated) < limit:
                if self._closed:
                    finish, detail = "cancelled", "the engine was closed"
                    break
                if time.perf_counter() > deadline:
                    finish, detail = "timeout", f"timeout ({request.timeout} s) reached"
                    break
                if matcher is not None and matcher.done:
                    finish, detail = "stop", f"the output satisfies the {matcher.kind} constraint"
                    break
                if len(tokens) > n_ctx:  # the pending token would not fit: make room
                    truncated += self._shift(tokens, request.protected)
                if self._threads is not None:
                    self._follow_free_cores()
                token = driver.next_token(matcher.mask() if matcher is not None else None)
                now = time.perf_counter()
                if first_token_at is None:
                    first_token_at = now
                if request.logprobs is not None:
                    logprobs.append(self._logprob(driver.logits(), token, request.logprobs))
                if token in backend.info.eog_ids:
                    finish, detail = "stop", "end of generation token"
                    if request.logprobs is not None:
                        logprobs.pop()  # the end token is not part of the result
                    break
                if matcher is not None:
                    matcher.consume(token)
                # Decode speed spans generated tokens only: a runtime that decodes ahead
                # (LiteRT-LM) hands over its end token at once.
                last_token_at = now
                generated.append(token)
                tokens.append(token)
                piece, hit = text.feed(backend.token_bytes(token))
                # One yield per token, text or not: generate_many drives sequences in lockstep.
                yield piece
                if hit is not None:
                    finish, detail = "stop", f"stop string {hit!r}"
                    break
            if matcher is not None and finish == "length" and not matcher.satisfied:
                detail = f"{detail} before the output satisfied the {matcher.kind} constraint"
            if sequence is not None:
                # Leave the batch before the held-back text goes out: that yield takes no
                # token, and a row still waiting in the lockstep would stall the next pass.
                sequence.finish()
            tail = text.finish(stopped=finish == "stop" and detail.startswith("stop string"))
            if tail:
                yield tail
        except GeneratorExit:
            finish, detail = "cancelled", "the stream was closed"
        except EdgeGemmaError:
            self._forget_cache()
            raise
        except Exception as exc:
            self._forget_cache()
            raise EdgeGemmaError(f"{backend.name} backend failed during generation: {exc}") from exc
        finally:
            self._unbind(request)
            self._free_doomed()

        end = time.perf_counter()
        decode_s = (
            last_token_at - first_token_at
            if first_token_at is not None and last_token_at is not None
            else 0.0
        )
        outcome.append(
            Result(
                text=text.text,
                token_ids=generated,
                finish_reason=finish,
                finish_detail=detail,
                adapters=dict(request.adapters),
                stats=Stats(
                    prompt_tokens=n_prompt,
                    cached_tokens=reused,
                    completion_tokens=len(generated),
                    truncated_tokens=truncated,
                    ttft_s=(first_token_at or end) - request.started,
                    prefill_s=prefill_s,
                    decode_s=decode_s,
                    total_s=end - request.started,
                    prefill_tps=_rate(n_prompt - reused, prefill_s),
                    decode_tps=_rate(len(generated) - 1, decode_s),
                    peak_rss_mb=peak_rss_mb(),
                    batch_size=batch_size,
                    runtime=backend.runtime_stats(),
                ),
                logprobs=logprobs if request.logprobs is not None else None,
            )
        )

    def _fit_context(self, request: _Request, n_ctx: int) -> tuple[list[int], int, int, str]:
        """Apply the overflow policy: (tokens to evaluate, tokens dropped, limit, limit reason)."""
        tokens = list(request.prompt_ids)
        wanted = request.max_tokens
        needed = len(tokens) + (wanted if wanted is not None else 1)
        policy = request.on_overflow

        def overflow(why: str) -> ContextOverflowError:
            advice = {
                "error": 'or pass on_overflow="truncate_left"',
                "truncate_left": "or protect less of the prompt with keep=",
                "shift": 'or pass on_overflow="truncate_left"',
            }[policy]
            return ContextOverflowError(
                f"{why}: the prompt has {len(request.prompt_ids)} tokens, max_tokens is "
                f"{wanted}, the context window holds n_ctx={n_ctx} tokens "
                f'(on_overflow="{policy}"). Shorten the prompt, lower max_tokens, load with a '
                f"larger n_ctx, {advice}.",
                prompt_tokens=len(request.prompt_ids),
                max_tokens=wanted,
                n_ctx=n_ctx,
            )

        truncated = request.dropped
        if policy == "shift":
            if len(tokens) >= n_ctx:
                raise overflow("the prompt alone fills the context window")
        elif needed > n_ctx:
            if policy == "error":
                raise overflow("prompt plus max_tokens exceed the context window")
            truncated = needed - n_ctx
            droppable = len(tokens) - request.protected - 1
            if truncated > droppable:
                raise overflow(
                    f"dropping old prompt tokens cannot make room: {request.protected} are "
                    "protected by keep="
                )
            del tokens[request.protected : request.protected + truncated]
        if wanted is None:
            return tokens, truncated, n_ctx - len(tokens), f"context window full (n_ctx={n_ctx})"
        return tokens, truncated, wanted, f"max_tokens ({wanted}) reached"

    def _shift(self, tokens: list[int], protected: int) -> int:
        """Discard half of the unprotected cached tokens (llama.cpp's context shift)."""
        keep = max(protected, 1)
        discard = (len(tokens) - 1 - keep) // 2
        if discard <= 0:
            raise ContextOverflowError(
                f"cannot shift the context: {keep} of {self.n_ctx} tokens are protected",
                prompt_tokens=len(tokens),
                max_tokens=None,
                n_ctx=self.n_ctx,
            )
        # Shifted keys are re-rotated, not recomputed: close to, but not bit-identical with, a
        # fresh evaluation. Forgetting them keeps "a reused prefix equals fresh computation".
        self._forget_cache()
        self._backend.shift(keep, discard)
        del tokens[keep : keep + discard]
        log.debug("shifted context: kept %d, discarded %d", keep, discard)
        return discard

    def _follow_free_cores(self) -> None:
        """Give the backend as many threads as there are free cores (see :mod:`.threads`)."""
        if self._threads is None:
            return
        wanted = self._threads.threads()
        if wanted != self._n_threads:
            self._backend.set_threads(wanted)
            self._n_threads = wanted

    def _forget_cache(self) -> None:
        self._cached_tokens = []
        self._cached_prompt = 0
        self._cached_key = ()

    def _bind(self, adapters: Mapping[str, float]) -> list[tuple[_LoadedAdapter, float]]:
        """The loaded adapters ``adapters`` names now, kept alive until :meth:`_unbind`."""
        with self._state:
            bound = []
            for name, scale in adapters.items():
                loaded = self._adapters.get(name)
                if loaded is None:
                    known = ", ".join(sorted(self._adapters)) or "none"
                    raise AdapterError(f"no adapter named {name!r} is loaded (loaded: {known})")
                bound.append((loaded, scale))
            for loaded, _ in bound:
                loaded.users += 1
            return bound

    def _unbind(self, request: _Request) -> None:
        with self._state:
            if request.released:
                return
            request.released = True
        self._unbind_all(request.bound)

    def _unbind_all(self, bound: list[tuple[_LoadedAdapter, float]]) -> None:
        with self._state:
            for loaded, _ in bound:
                loaded.users -= 1
                if loaded.unloaded and loaded.users == 0:
                    self._doomed.append(loaded)

    def _free_doomed_if_idle(self) -> None:
        """Free unloaded adapters now if nobody holds the engine (else its holder will)."""
        if self._doomed and not self._closed and self._lock.acquire(blocking=False):
            try:
                self._free_doomed()
            finally:
                self._lock.release()

    def _free_doomed(self) -> None:
        """Free unloaded adapters no call uses any more. Only under the engine lock."""
        with self._state:
            doomed, self._doomed = self._doomed, []
        for loaded in doomed:
            if any(uid == loaded.uid for uid, _ in self._cached_key):
                self._forget_cache()
            self._backend.free_adapter(loaded.handle)

    def _check_adapter_set(self, adapters: object) -> dict[str, float]:
        if adapters is None:
            return {}
        if not isinstance(adapters, Mapping):
            raise InvalidParameterError(
                f"adapters must be a mapping of name to scale or None, got {adapters!r}"
            )
        checked: dict[str, float] = {}
        for name, scale in adapters.items():
            if not isinstance(name, str) or name not in self._adapters:
                loaded = ", ".join(sorted(self._adapters)) or "none"
                raise AdapterError(f"no adapter named {name!r} is loaded (loaded: {loaded})")
            # Runtimes take the scale as a C float: 1e39 passes isfinite() but is infinite there.
            check_float32("adapter scale", scale)
            if scale != 0:  # a zero scale is the base model: leave the adapter out entirely
                checked[name] = float(scale)
        return checked

    def _prompt_ids(self, prompt: object) -> list[int]:
        """The token ids a prompt stands for: text is tokenized (BOS first), ids are taken as
        they are."""
        if isinstance(prompt, str):
            ids = self.tokenize(prompt)
            if not ids:
                raise InvalidParameterError(
                    "the prompt is empty and this model takes no BOS token: give some text"
                )
            return ids
        if isinstance(prompt, (bytes, bytearray, memoryview)):
            raise InvalidParameterError("the prompt is bytes; decode it to str (or pass token ids)")
        ids = self._check_ids(prompt)
        if not ids:
            raise InvalidParameterError(
                "the prompt is an empty list of token ids: give text, or at least one id "
                "(ids are taken as they are, so a BOS token is not added)"
            )
        return ids

    def _check_ids(self, token_ids: object) -> list[int]:
        if isinstance(token_ids, np.ndarray):
            if token_ids.ndim != 1 or not np.issubdtype(token_ids.dtype, np.integer):
                raise InvalidParameterError(
                    f"token ids must be a 1-D array of integers, got {token_ids.dtype} "
                    f"with shape {token_ids.shape}"
                )
            token_ids = token_ids.tolist()
        if isinstance(token_ids, (str, bytes, bytearray, Mapping)) or not isinstance(
            token_ids, (Sequence, np.ndarray)
        ):
            raise InvalidParameterError(
                "the prompt must be text (str) or a sequence of token ids, "
                f"got {type(token_ids).__name__}"
            )
        vocab = self._backend.info.vocab_size
        ids = []
        for t in token_ids:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                raise InvalidParameterError(
                    f"token ids must be integers, got {t!r} ({type(t).__name__})"
                )
            if not 0 <= t < vocab:
                raise InvalidParameterError(f"token id {t} is outside the vocabulary [0, {vocab})")
            ids.append(int(t))
        return ids

    def _protected_length(self, prompt: object, prompt_ids: list[int], keep: int | str) -> int:
        bos = 1 if isinstance(prompt, str) and self._backend.info.bos_id is not None else 0
        if isinstance(keep, str):
            if not isinstance(prompt, str) or not prompt.startswith(keep):
                raise InvalidParameterError("keep= as a string must be a prefix of the text prompt")
            n = bos + len(self._backend.tokenize(keep)) if keep else bos
            if prompt_ids[:n] != self.tokenize(keep)[:n]:
                raise InvalidParameterError(
                    f"keep={keep!r} does not end on a token boundary of the prompt; "
                    "end it with a space or newline, or pass a token count"
                )
            return n
        if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep <= len(prompt_ids):
            raise InvalidParameterError(
                f"keep must be a token count in [0, {len(prompt_ids)}] or a prompt prefix, got {keep!r}"
            )
        return max(keep, bos)

    def _reusable(
        self, tokens: list[int], key: tuple[tuple[int, float], ...], *, with_adapters: bool
    ) -> int:
        """How many leading ``tokens`` the backend may take from its KV cache."""
        if key != self._cached_key:
            return 0
        limit = len(tokens) - 1  # the last token is evaluated again: its logits are needed
        if self.prefix_cache != "always":
            info = self._backend.info
            if not (info.exact_reuse_with_adapters if with_adapters else info.exact_reuse):
                return 0
            limit = min(limit, self._cached_prompt)
        return min(_common_prefix(self._cached_tokens, tokens), limit)

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosedError("the engine is closed")

    def _acquire(self, holder: _Holder) -> None:
        if self._holder_thread() == threading.get_ident():
            raise EngineBusyError(
                "another stream of this engine is open and this thread is iterating it; "
                "exhaust or close() it before starting a new call"
            )
        self._lock.acquire()
        if self._closed:
            self._lock.release()
            raise EngineClosedError("the engine is closed")
        with self._state:
            self._holder = weakref.ref(holder)

    def _release(self) -> None:
        with self._state:
            self._holder = None
            close_now, self._close_pending = self._close_pending, False
        try:
            if close_now:
                self._close_backend()
        finally:
            self._lock.release()

    def _holder_thread(self) -> int | None:
        """The thread iterating the stream that holds the engine, if a stream holds it."""
        holder = self._holder() if self._holder is not None else None
        return holder.thread if holder is not None else None

    def _reading(self) -> contextlib.AbstractContextManager[None]:
        """The lock for a read of the model, unless this thread's open stream holds it already
        (the backend is then paused between two tokens)."""
        self._check_open()
        if self._holder_thread() == threading.get_ident():
            return contextlib.nullcontext()
        return _Exclusive(self)

    def _exclusive(self) -> _Exclusive:
        self._check_open()
        if self._holder_thread() == threading.get_ident():
            raise EngineBusyError("a stream of this engine is open in this thread; close it first")
        return _Exclusive(self)


class Together(_Holder, Iterator[tuple[int, str]]):
    """Streams running together (:meth:`Engine.run_together`): an iterator of ``(index,
    text)``, where ``index`` is the stream's position in the order the streams were given
    and added. :meth:`close` cancels the streams running; those not started are left without
    a result."""

    def __init__(self, engine: Engine, streams: Sequence[Stream], batch_min: int):
        super().__init__(engine)
        self._batch_min = batch_min
        # Index -> each stream not finished yet, and how it fits the context: a long-running
        # run (a server's) keeps only what is waiting or running.
        self._streams: dict[int, Stream] = {}
        self._fitted: dict[int, tuple[list[int], int, int, str]] = {}
        self._added = 0
        self._waiting: list[int] = []
        """Indices of the streams not started yet, in the order they came."""
        self._over = False
        try:
            for stream in streams:
                self._admit(stream)
        except BaseException:
            for stream in self._streams.values():
                stream.close()  # unbinds their adapters
            raise
        self._pieces: Generator[tuple[int, str], None, None] = engine._run_together(self)

    def add(self, stream: Stream) -> int:
        """Run ``stream`` (made by :meth:`Engine.stream` or :meth:`Engine.stream_chat`, not
        yet iterated) too, and return its index. Call it from the thread iterating, between
        two pieces. On a backend that can grow a running batch (llama.cpp) a stream with the
        batch's adapter set and sampling settings joins it at the next pass when a row and
        its context cells are free; otherwise it waits for the streams before it."""
        if self._over:
            raise InvalidParameterError("these streams have finished; start a new run_together")
        return self._admit(stream)

    def _admit(self, stream: Stream) -> int:
        engine = self._engine
        if (
            not isinstance(stream, Stream)
            or stream._engine is not engine
            or stream._outcome
            or stream._holding_lock
            or any(stream is other for other in self._streams.values())
        ):
            raise InvalidParameterError(
                "run_together takes streams of this engine that have not been iterated"
            )
        index = self._added
        self._fitted[index] = engine._fit_context(stream._request, engine.n_ctx)
        stream._mutex = self._mutex  # this run's thread drives it now
        self._streams[index] = stream
        self._waiting.append(index)
        self._added += 1
        return index

    def _still_waiting(self) -> list[int]:
        """The streams not started yet, less those closed meanwhile: they never start (and
        have no result), since closing them gave their adapters back."""
        for index in self._waiting:
            if self._streams[index]._request.released:
                self._forget(index)
        self._waiting = [i for i in self._waiting if i in self._streams]
        return list(self._waiting)

    def _forget(self, index: int) -> None:
        """The stream at ``index`` has finished (its adapters are given back) or never will."""
        del self._streams[index], self._fitted[index]

    def __next__(self) -> tuple[int, str]:
        # Between two pieces its thread may read the model: tokenize a new stream's prompt.
        return self._step(self._over, self._pieces.__next__)

    def __del__(self) -> None:
        if self._holding_lock:
            self.close()


class _Exclusive:
    def __init__(self, engine: Engine):
        self._engine = engine

    def __enter__(self) -> None:
        self._engine._lock.acquire()
        if self._engine._closed:
            self._engine._lock.release()
            raise EngineClosedError("the engine is closed")

    def __exit__(self, *exc_info: object) -> None:
        self._engine._lock.release()


class _TextAssembler:
    """Turns token bytes into text, holding back what could still become a stop string."""

    def __init__(self, stops: tuple[str, ...]):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = stops
        self._longest = max((len(s) for s in stops), default=0)
        self._text = ""
        self._emitted = 0

    @property
    def text(self) -> str:
        return self._text[: self._emitted]

    def feed(self, data: bytes) -> tuple[str, str | None]:
        """Add a token's bytes; return (text safe to emit, stop string hit or None)."""
        self._text += self._decoder.decode(data)
        if self._stops:
            window_start = max(0, self._emitted - self._longest)
            hits = [
                (pos, s) for s in self._stops if (pos := self._text.find(s, window_start)) != -1
            ]
            if hits:
                pos, hit = min(hits)
                self._text = self._text[:pos]
                return self._advance(pos), hit
        return self._advance(len(self._text) - self._held_back()), None

    def finish(self, *, stopped: bool) -> str:
        if not stopped:
            self._text += self._decoder.decode(b"", final=True)
        return self._advance(len(self._text))

    def _held_back(self) -> int:
        """Length of the longest text suffix that is a proper prefix of a stop string."""
        for n in range(min(self._longest - 1, len(self._text) - self._emitted), 0, -1):
            tail = self._text[-n:]
            if any(s.startswith(tail) for s in self._stops):
                return n
        return 0

    def _advance(self, end: int) -> str:
        piece = self._text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return piece


def load(
    model: str | os.PathLike[str] | None = None,
    *,
    backend: str | None = None,
    n_ctx: int = 2048,
    n_threads: int | None = None,
    on_overflow: OverflowPolicy = "error",
    prefix_cache: PrefixCachePolicy = "exact",
    **options: object,
) -> Engine:
    """Load a base model: a name from models.lock (fetched on first use) or a file path.

    Without ``model``: Gemma 3 270M, the fast variant on llama.cpp
    (:data:`edgegemma.models.DEFAULT_MODEL`), the pinned file on the other backends, whose
    builds are made from it (:func:`edgegemma.models.default_model`).

    ``prefix_cache="exact"`` reuses a cached prompt prefix only where that gives exactly the
    fresh answer (llama.cpp without adapters); ``"always"`` reuses it whenever the adapter set
    matches, for speed with long shared prefixes, at the price of answers that can differ
    slightly with what was cached before.
    """
    from . import models

    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or not 16 <= n_ctx <= 2**20:
        raise InvalidParameterError(f"n_ctx must be an integer in [16, 1048576], got {n_ctx!r}")
    # llama.cpp pads the context to a multiple of 256; every backend gets the same window.
    n_ctx = -(-n_ctx // N_CTX_STEP) * N_CTX_STEP
    cores = len(usable_cores())
    policy = ThreadPolicy(default_threads(), fixed=False) if n_threads is None else None
    if n_threads is None:
        n_threads = default_threads()
    elif (
        isinstance(n_threads, bool) or not isinstance(n_threads, int) or not 1 <= n_threads <= cores
    ):
        raise InvalidParameterError(
            f"n_threads must be an integer from 1 to the {cores} cores this process may use, "
            f"got {n_threads!r}"
        )
    _check_policy(on_overflow)
    _check_prefix_cache(prefix_cache)
    path = models.resolve(models.default_model(backend) if model is None else model)
    name = backend or backend_for_path(path)
    backend_class = get_backend(name)
    unknown = set(options) - backend_class.features.options
    if unknown:
        known = ", ".join(sorted(backend_class.features.options)) or "none"
        raise InvalidParameterError(
            f"unknown {name} options: {', '.join(sorted(unknown))} (it takes: {known})"
        )
    opened = backend_class.open(
        path, BackendOptions(n_ctx=n_ctx, n_threads=n_threads, extra=dict(options))
    )
    return Engine(
        opened, model_path=path, on_overflow=on_overflow, prefix_cache=prefix_cache, threads=policy
    )


def _kind(request: _Request) -> object:
    """What requests must share to run as one batch: sampling settings and adapter set."""
    return (request.sampling, tuple((id(a), s) for a, s in request.bound))


def _adapter_key(bound: Sequence[tuple[_LoadedAdapter, float]]) -> tuple[tuple[int, float], ...]:
    """What the KV cache is keyed by: each adapter's load (not its name) and scale."""
    return tuple(sorted((loaded.uid, scale) for loaded, scale in bound))


def _check_batch(prompts: object) -> list[Any]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise InvalidParameterError(
            f"prompts must be a list of prompts (text or token ids), got {type(prompts).__name__}"
        )
    return list(prompts)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _rate(count: int, seconds: float) -> float:
    return count / seconds if count > 0 and seconds > 0 else 0.0


_LABELS_PER_TIMEOUT_CHECK = 32
"""Labels scored between two looks at the clock when ``classify`` has a timeout: each
scoring call after the first re-evaluates only the prompt's last token (its KV is kept)."""


def _check_timeout(timeout: object) -> None:
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0
    ):
        raise InvalidParameterError(
            f"timeout must be a positive number of seconds, got {timeout!r}"
        )


def _check_policy(policy: object) -> None:
    if policy not in OVERFLOW_POLICIES:
        raise InvalidParameterError(
            f"on_overflow must be one of {', '.join(OVERFLOW_POLICIES)}; got {policy!r}"
        )


def _check_prefix_cache(policy: object) -> None:
    if policy not in PREFIX_CACHE_POLICIES:
        raise InvalidParameterError(
            f"prefix_cache must be one of {', '.join(PREFIX_CACHE_POLICIES)}; got {policy!r}"
        )


def _check_stop(stop: object) -> tuple[str, ...]:
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, Sequence) or not all(isinstance(s, str) and s for s in stop):
        raise InvalidParameterError(f"stop must be a list of non-empty strings, got {stop!r}")
    return tuple(stop)


def _check_text(text: object) -> str:
    if not isinstance(text, str):
        raise InvalidParameterError(
            f"the prompt must be a str or a list of token ids, got {type(text).__name__}"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidParameterError(f"the prompt is not valid Unicode text: {exc}") from exc
    return text
