"""The engine's worker thread: requests wait in arrival order and run on it, up to
``parallel`` at a time, their pieces and Results handed to the event loop."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
from fastapi import Request

from ..engine import Engine
from ..errors import EdgeGemmaError
from ..files import sha256_file
from ..options import ENGINE_ADAPTERS
from ..results import Result
from ..streams import Stream
from .protocol import APIError, SamplingRequest, api_error
from .updates import AdapterFeed


class Run:
    """One generation on the engine's worker thread; its Result (and, with ``pieces``, each
    text piece) reaches the event loop through a queue. :meth:`cancel` ends it at the next
    token.

    Without ``pieces`` the event loop is not woken per token: on a small device its thread
    would take CPU time from the model's threads (docs/performance.md).
    """

    def __init__(self, server: Server, make: Callable[[], Stream], *, pieces: bool):
        self._loop = asyncio.get_running_loop()
        self.make = make
        self.pieces = pieces
        self._queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.cancelled = threading.Event()
        self._left = asyncio.Event()
        """Set once the worker is done with this run."""
        server.submit(self)

    def put(self, kind: str, value: object) -> None:
        """From the worker: a piece, the Result (``done``) or an error; the last two end it."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (kind, value))
        if kind != "piece":
            self._loop.call_soon_threadsafe(self._left.set)

    async def next(self) -> str | Result | None:
        """The next piece of text, then the Result, then None; engine errors are raised."""
        kind, value = await self._queue.get()
        if kind == "error":
            raise value
        return value

    def cancel(self) -> None:
        self.cancelled.set()

    async def finish(self) -> None:
        """Cancel the generation and wait until the worker has left it."""
        self.cancelled.set()
        with anyio.CancelScope(shield=True):  # a cancelled request still waits for its worker
            await self._left.wait()


class Server:
    """The state the routes share: the engine, its worker thread and the model names.

    Requests wait in arrival order; the worker runs up to ``parallel`` of them at a time
    together (:meth:`Engine.run_together`): those with the same adapter set and sampling
    settings as one batch of the backend where it has batches, the others after. Each is
    answered as soon as it finishes, and a request that arrives while others run takes a
    free place at once (:meth:`Together.add`: on llama.cpp it joins the running batch; with
    ``parallel`` above 1 a request running alone is a batch of one for that)."""

    def __init__(self, engine: Engine, model: str, api_key: str | None, parallel: int = 1):
        self.engine = engine
        self.model = model
        self.api_key = api_key
        self.parallel = parallel
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgegemma-engine")
        self._waiting: list[Run] = []
        self._waiting_lock = threading.Lock()
        self._changes: list[tuple[Callable[[], None], Future[None]]] = []
        """Changes of the engine waiting for a moment between requests (guarded as waiting)."""
        self.created = int(time.time())
        self.generations: Counter[str] = Counter()
        """Generations run, by finish reason (``cancelled``: the client left)."""
        self.feed: AdapterFeed | None = None
        """Where new adapter versions come from while serving (``--adapter-repo``)."""
        self._file_hashes: dict[tuple[Path, int], str] = {}

    def submit(self, run: Run) -> None:
        with self._waiting_lock:
            self._waiting.append(run)
        # One turn of the worker per run: a turn whose run an earlier turn already took
        # finds it gone and takes the runs that arrived since, or none.
        self.executor.submit(self._turn)

    def between_requests(self, change: Callable[[], None]) -> None:
        """Run ``change`` (an adapter swap) on the worker between requests, and wait for it:
        the requests it already runs finish as they started, those waiting start after the
        change. Under steady load the running batch takes in no new request meanwhile."""
        done: Future[None] = Future()
        with self._waiting_lock:
            self._changes.append((change, done))
        self.executor.submit(self._turn)
        done.result()

    def _turn(self) -> None:
        with self._waiting_lock:
            changes, self._changes = self._changes, []
        for change, done in changes:
            try:
                change()
            except BaseException as exc:  # noqa: BLE001 -- the caller gets it
                done.set_exception(exc)
            else:
                done.set_result(None)
        # Index in the run -> a request not answered yet and its stream: under steady load the
        # run goes on, so it holds only those.
        live: dict[int, tuple[Run, Stream]] = {}

        def take(count: int) -> list[tuple[Run, Stream]]:
            with self._waiting_lock:
                if self._changes:  # a change waits: this run ends with what it holds
                    return []
                runs, self._waiting = self._waiting[:count], self._waiting[count:]
            made = []
            for run in runs:
                if run.cancelled.is_set():  # its client left while it waited for its turn
                    run.put("done", None)
                    continue
                try:
                    made.append((run, run.make()))
                except Exception as exc:  # noqa: BLE001 -- every failure must reach its request
                    run.put("error", exc)
            return made

        def answer_finished() -> None:
            for index, (run, stream) in list(live.items()):
                if stream.finished:
                    del live[index]
                    if stream.error is not None:  # its own failure: it alone ends with it
                        run.put("error", stream.error)
                        continue
                    self._record(stream.result)
                    run.put("done", stream.result)

        first = take(self.parallel)
        if not first:
            return
        live.update(enumerate(first))  # run_together numbers the streams it is given so
        failure: Exception = EdgeGemmaError("the generation did not finish")
        try:
            # A request running alone is a batch too where later ones can join it.
            joinable = self.parallel > 1 and self.engine.features.batch_join
            together = self.engine.run_together(
                [stream for _, stream in first], batch_min=1 if joinable else None
            )
            for index, piece in together:
                run = live[index][0]
                if run.pieces:
                    run.put("piece", piece)
                for waiting, (run, stream) in list(live.items()):
                    if run.cancelled.is_set():
                        stream.close()  # a running one ends at its next token
                        if not stream.finished:  # it had not started: it never will
                            del live[waiting]
                            run.put("done", None)
                # A request that finished is answered now, not when the batch ends; requests
                # that arrived meanwhile come in while there is room (they join the running
                # batch where the backend can grow one).
                answer_finished()
                free = self.parallel - len(live)
                if free > 0 and self._waiting:
                    for run, stream in take(free):
                        live[together.add(stream)] = (run, stream)
        except Exception as exc:  # noqa: BLE001 -- every failure must reach its request
            failure = exc
        answer_finished()
        for run, _ in live.values():  # the failure ended it, or it never started
            run.put("error", failure)

    def _record(self, result: Result) -> None:
        self.generations[result.finish_reason] += 1  # only the worker thread writes

    def model_facts(self, model_id: str) -> dict[str, Any]:
        """An adapter's ``version`` (where a repository serves it) and the ``sha256`` of the
        file being served under ``model_id``; nothing for the base model."""
        _, sep, name = model_id.partition(":")
        path = self.engine.adapters.get(name) if sep else None
        if path is None:
            return {}
        served = self.feed.served.get(name) if self.feed is not None else None
        if served is not None:
            return {"version": served[0], "sha256": served[1]}
        key = (path, path.stat().st_mtime_ns)
        if key not in self._file_hashes:
            self._file_hashes[key] = sha256_file(path)
        return {"version": None, "sha256": self._file_hashes[key]}

    def model_ids(self) -> list[str]:
        return [self.model, *(f"{self.model}:{name}" for name in self.engine.adapters)]

    def adapters_for(self, request: SamplingRequest) -> Any:
        """The adapter set a request's model name and ``adapters`` field stand for."""
        base, sep, adapter = request.model.partition(":")
        if base != self.model or (sep and adapter not in self.engine.adapters):
            raise APIError(
                404,
                f"the model {request.model!r} does not exist; this server has "
                f"{', '.join(self.model_ids())}",
                code="model_not_found",
                param="model",
            )
        if sep and request.adapters is not None:
            raise APIError(
                400,
                "name the adapter either in the model or in adapters, not both",
                param="adapters",
            )
        if sep:
            return {adapter: 1.0}
        if request.adapters is not None:
            return request.adapters
        return ENGINE_ADAPTERS

    async def start(self, make: Callable[[], Stream]) -> tuple[Run, str | Result | None]:
        """Start a streamed generation and wait for its first piece (or its Result), so that
        a request the engine refuses is answered with an error status before any of the
        response is sent."""
        run = Run(self, make, pieces=True)
        try:
            first = await run.next()
        except EdgeGemmaError as exc:
            raise api_error(exc) from None
        except BaseException:
            await run.finish()
            raise
        return run, first


async def collect(
    server: Server, makes: Sequence[Callable[[], Stream]], request: Request
) -> list[Result]:
    """The Results of generations whose client waits for the whole answer, run one after
    another. From the start a client that disconnects cancels the one running (at its next
    token), and those after it never start."""
    left = asyncio.Event()
    running: list[Run] = []

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        left.set()
        for run in running:
            run.cancel()

    watcher = asyncio.create_task(watch())
    results = []
    try:
        for make in makes:
            if left.is_set():
                raise APIError(499, "the client closed the request", code="cancelled")
            run = Run(server, make, pieces=False)
            running[:] = [run]
            try:
                item = await run.next()
                while not isinstance(item, Result):
                    if item is None:
                        raise APIError(499, "the client closed the request", code="cancelled")
                    item = await run.next()
            except EdgeGemmaError as exc:
                raise api_error(exc) from None
            finally:
                await run.finish()
            results.append(item)
        return results
    finally:
        watcher.cancel()
