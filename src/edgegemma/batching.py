"""Streams running together (:meth:`~edgegemma.Engine.run_together`,
:meth:`~edgegemma.Engine.generate_many`): which run as one batch of the backend's sequences,
in which order, and who joins a running batch."""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence
from typing import Protocol

from .backends.base import Backend, BatchedSequence, Features
from .errors import InvalidParameterError
from .options import Fitted, Request
from .results import Result
from .streams import Holder, Owner, Stream


class Host(Owner, Protocol):
    """What a :class:`Together` asks of the engine it runs on, besides holding it."""

    @property
    def n_ctx(self) -> int: ...

    def _fit_context(self, request: Request, n_ctx: int) -> Fitted: ...

    def _generate(
        self,
        request: Request,
        outcome: list[Result],
        sequence: BatchedSequence | None = None,
        batch_size: int = 1,
    ) -> Generator[str, None, None]: ...

    def _forget_cache(self) -> None: ...

    def _free_doomed(self) -> None: ...


def batch_groups(sizes: list[tuple[int, int]], features: Features, n_ctx: int) -> list[list[int]]:
    """Indices of sequences, given as (prompt tokens, cells needed), in groups the backend
    can evaluate together: at most ``features.batch``, needing at most ``n_ctx`` cells in
    all, of one prompt length where the backend cannot pad. Indices keep their order within
    a group."""
    open_groups: dict[int, tuple[list[int], int]] = {}  # prompt length or 0 -> (group, cells)
    groups: list[list[int]] = []
    for index, (length, need) in enumerate(sizes):
        key = length if features.batch_same_length else 0
        group, cells = open_groups.get(key, ([], 0))
        if not group or len(group) >= features.batch or cells + need > n_ctx:
            group, cells = [], 0
            groups.append(group)
        group.append(index)
        open_groups[key] = (group, cells + need)
    return groups


class Together(Holder, Iterator[tuple[int, str]]):
    """Streams running together (:meth:`~edgegemma.Engine.run_together`): an iterator of
    ``(index, text)``, where ``index`` is the stream's position in the order the streams were
    given and added. :meth:`close` cancels the streams running; those not started are left
    without a result.

    Streams with the same adapter set and sampling settings run together; the others one
    group after another, the group of the stream waiting longest first.
    """

    def __init__(self, engine: Host, backend: Backend, streams: Sequence[Stream], batch_min: int):
        super().__init__(engine)
        self._host = engine
        self._backend = backend
        self._batch_min = batch_min
        # Index -> each stream not finished yet, and how it fits the context: a long-running
        # run (a server's) keeps only what is waiting or running.
        self._streams: dict[int, Stream] = {}
        self._fitted: dict[int, Fitted] = {}
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
        self._pieces: Generator[tuple[int, str], None, None] = self._run()

    def add(self, stream: Stream) -> int:
        """Run ``stream`` (made by :meth:`Engine.stream` or :meth:`Engine.stream_chat`, not
        yet iterated) too, and return its index. Call it from the thread iterating, between
        two pieces. On a backend that can grow a running batch (llama.cpp) a stream with the
        batch's adapter set and sampling settings joins it at the next pass when a row and
        its context cells are free; otherwise it waits for the streams before it."""
        if self._over:
            raise InvalidParameterError("these streams have finished; start a new run_together")
        return self._admit(stream)

    def __next__(self) -> tuple[int, str]:
        # Between two pieces its thread may read the model: tokenize a new stream's prompt.
        return self._step(self._over, self._pieces.__next__)

    def __del__(self) -> None:
        if self._holding_lock:
            self.close()

    def _admit(self, stream: Stream) -> int:
        if (
            not isinstance(stream, Stream)
            or stream._engine is not self._host
            or stream._outcome
            or stream._holding_lock
            or any(stream is other for other in self._streams.values())
        ):
            raise InvalidParameterError(
                "run_together takes streams of this engine that have not been iterated"
            )
        index = self._added
        self._fitted[index] = self._host._fit_context(stream._request, self._host.n_ctx)
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

    def _run(self) -> Generator[tuple[int, str], None, None]:
        """The pieces of the streams; runs while this holds the engine."""
        try:
            while self._still_waiting():
                for index, piece in self._run_group(self._next_group()):
                    if piece:
                        yield index, piece
        finally:
            self._over = True
            for stream in list(self._streams.values()):
                stream.close()  # unbinds its adapters; a stream not yet finished is cancelled
            self._host._free_doomed()

    def _next_group(self) -> list[int]:
        """Take from the waiting streams the first batch the backend can evaluate together
        among those of the longest-waiting stream's adapter set and sampling."""
        kind = self._streams[self._waiting[0]]._request.kind
        members = [i for i in self._waiting if self._streams[i]._request.kind == kind]
        sizes = [(len(self._fitted[i].tokens), self._fitted[i].cells) for i in members]
        first = batch_groups(sizes, self._backend.features, self._host.n_ctx)[0]
        group = [members[i] for i in first]
        self._waiting = [i for i in self._waiting if i not in group]
        return group

    def _run_group(self, group: list[int]) -> Iterator[tuple[int, str]]:
        """Run the streams at ``group`` as one batch of the backend's sequences (a few: one by
        one), yielding ``(index, text)`` once per token of each. Between two passes, waiting
        streams of the same kind join the batch where the backend can grow one."""
        if not self._backend.features.batch or len(group) < self._batch_min:
            yield from self._run_one_by_one(group)
            return
        request = self._streams[group[0]]._request
        self._host._forget_cache()  # the batch replaces the backend's own sequence
        sequences = self._backend.batch(
            [self._fitted[i].tokens for i in group],
            max_tokens=max(self._fitted[i].limit for i in group),
            adapters=request.handles,
            sampling=request.sampling,
        )
        running: dict[int, BatchedSequence] = {}
        for index, sequence in zip(group, sequences):
            self._drive(index, sequence, len(group))
            running[index] = sequence
        try:
            while running:  # one token of each sequence per round: one pass of the model
                if self._backend.features.batch_join:
                    self._join(request.kind, running)
                for index, sequence in list(running.items()):
                    try:
                        piece = next(self._streams[index]._pieces)
                    except (StopIteration, InvalidParameterError) as ended:
                        # Finished, closed, or failed on its own input (a constraint with no
                        # way forward): it leaves the batch, the others run on.
                        if isinstance(ended, InvalidParameterError):
                            self._streams[index]._failure.append(ended)
                        sequence.finish()
                        del running[index]
                        self._forget(index)
                        continue
                    yield index, piece
        finally:
            for index, sequence in running.items():
                self._streams[index]._pieces.close()
                sequence.finish()
            self._host._forget_cache()  # each sequence recorded its tokens as the cache's

    def _run_one_by_one(self, group: list[int]) -> Iterator[tuple[int, str]]:
        for index in group:
            stream = self._streams[index]
            try:
                for piece in stream._pieces:
                    yield index, piece
            except InvalidParameterError as exc:  # its own input: it alone ends
                stream._failure.append(exc)
            self._forget(index)

    def _join(self, kind: object, running: dict[int, BatchedSequence]) -> None:
        """Between two passes: add to the batch the waiting streams of its kind that fit, in
        the order they came, while it has rows free."""
        cells = sum(self._fitted[i].cells for i in running)
        for index in self._still_waiting():
            if len(running) >= self._backend.features.batch:
                break
            fitted = self._fitted[index]
            if (
                self._streams[index]._request.kind != kind
                or cells + fitted.cells > self._host.n_ctx
            ):
                continue
            sequence = self._backend.join(fitted.tokens, max_tokens=fitted.limit)
            self._waiting.remove(index)
            cells += fitted.cells
            running[index] = sequence
            self._drive(index, sequence, len(running))

    def _drive(self, index: int, sequence: BatchedSequence, batch_size: int) -> None:
        # The stream's generation now drives its sequence of the batch (the generator it had
        # was never started); closing the stream closes this one.
        stream = self._streams[index]
        stream._pieces = self._host._generate(
            stream._request, stream._outcome, sequence, batch_size
        )
