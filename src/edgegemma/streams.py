"""A generation as it runs: :class:`Stream`, what holds the engine while a thread iterates it,
and the assembly of token bytes into text."""

from __future__ import annotations

import codecs
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, Self, TypeVar

import numpy as np

from .backends.base import log_probs
from .errors import EdgeGemmaError
from .memory import peak_rss_mb
from .options import Request
from .results import FinishReason, Result, Stats, TokenLogprob

_T = TypeVar("_T")


class Owner(Protocol):
    """What a holder asks of the engine it holds (:class:`~edgegemma.Engine` is one)."""

    def _acquire(self, holder: Holder) -> None:
        """Take the engine for ``holder`` (waits for the one holding it)."""

    def _release(self) -> None:
        """Give the engine back."""

    def _unbind(self, request: Request) -> None:
        """The request has ended: its adapters may be freed (once only)."""

    def _free_doomed_if_idle(self) -> None:
        """Free unloaded adapters now if nobody holds the engine."""


class Holder:
    """What holds the engine while a thread iterates it (a :class:`Stream`, a
    :class:`~edgegemma.batching.Together`): it takes the engine's lock on its first step and
    keeps it between steps, so that its own thread may still read the model there and
    another thread's ``close()`` ends it; it gives the lock back when it ends or is closed.

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

    def __init__(self, engine: Owner):
        self._engine = engine
        self._mutex = threading.RLock()
        """Held while a step runs and while closing; a stream run by a Together shares the
        Together's, since the Together's thread drives it."""
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
                if self._closing:  # closed from another thread, which waits for this step
                    self._pieces.close()
                    raise StopIteration
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


Generation = Callable[[Request, list[Result]], Generator[str, None, None]]
"""Runs a request, yielding once per generated token, and appends its Result to the list."""


class Stream(Holder, Iterator[str]):
    """Text pieces of one generation as they are produced.

    Iterate it; afterwards :attr:`result` holds the :class:`Result`. Breaking out of the loop
    and calling :meth:`close` (or leaving a ``with`` block) cancels the generation (its
    result's finish_reason is then ``"cancelled"``); the engine stays consistent for the next
    call.
    """

    def __init__(self, engine: Owner, request: Request, generation: Generation):
        super().__init__(engine)
        # The generator writes the Result here; holding no reference back to the Stream lets
        # an abandoned stream be freed (and its lock released) as soon as the loop drops it.
        self._outcome: list[Result] = []
        self._failure: list[EdgeGemmaError] = []
        """What ended it inside a Together, where its own bad input (a constraint) ends it
        alone and the others run on."""
        self._request = request
        self._pieces: Generator[str, None, None] = generation(request, self._outcome)

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
        """The error that ended it in a :func:`~edgegemma.Engine.run_together` (its
        :attr:`result` raises it), or None."""
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


class TextAssembler:
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


@dataclass
class Progress:
    """What a generation has produced so far, and when: its Result once it has ended."""

    text: TextAssembler
    prompt_tokens: int
    truncated: int
    detail: str
    finish: FinishReason = "length"
    generated: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    reused: int = 0
    prefill_s: float = 0.0
    first_token_at: float | None = None
    last_token_at: float | None = None
    _latest: float = 0.0

    def end(self, finish: FinishReason, detail: str) -> None:
        self.finish, self.detail = finish, detail

    def arrived(self, now: float) -> None:
        """A token came from the runtime at ``now`` (perhaps the end token)."""
        self._latest = now
        if self.first_token_at is None:
            self.first_token_at = now

    def add(self, token: int, logprob: TokenLogprob | None) -> None:
        """The token that arrived last is part of the output."""
        # Decode speed spans generated tokens only: a runtime that decodes ahead (LiteRT-LM)
        # hands over its end token at once.
        self.last_token_at = self._latest
        self.generated.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)

    def result(self, request: Request, batch_size: int, runtime: dict[str, float]) -> Result:
        end = time.perf_counter()
        first, last = self.first_token_at, self.last_token_at
        decode_s = last - first if first is not None and last is not None else 0.0
        return Result(
            text=self.text.text,
            token_ids=self.generated,
            finish_reason=self.finish,
            finish_detail=self.detail,
            adapters=dict(request.adapters),
            stats=Stats(
                prompt_tokens=self.prompt_tokens,
                cached_tokens=self.reused,
                completion_tokens=len(self.generated),
                truncated_tokens=self.truncated,
                ttft_s=(first or end) - request.started,
                prefill_s=self.prefill_s,
                decode_s=decode_s,
                total_s=end - request.started,
                prefill_tps=_rate(self.prompt_tokens - self.reused, self.prefill_s),
                decode_tps=_rate(len(self.generated) - 1, decode_s),
                peak_rss_mb=peak_rss_mb(),
                batch_size=batch_size,
                runtime=runtime,
            ),
            logprobs=self.logprobs if request.logprobs is not None else None,
        )


def token_logprob(
    logits: np.ndarray, token: int, top: int, token_bytes: Callable[[int], bytes]
) -> TokenLogprob:
    """``token``'s log-probability under ``logits`` and the ``top`` most likely tokens, most
    likely first."""
    values = log_probs(logits)
    best = np.argpartition(-values, top)[:top] if top else np.array([], dtype=np.int64)
    best = best[np.argsort(-values[best], kind="stable")]

    def text(t: int) -> str:
        return token_bytes(t).decode("utf-8", "replace")

    return TokenLogprob(
        token=token,
        text=text(token),
        logprob=float(values[token]),
        top=[TokenLogprob(int(t), text(int(t)), float(values[t])) for t in best],
    )


def _rate(count: int, seconds: float) -> float:
    return count / seconds if count > 0 and seconds > 0 else 0.0
