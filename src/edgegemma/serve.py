"""``edgegemma serve``: an OpenAI-compatible HTTP server over one engine.

Any OpenAI client can use it: ``GET /v1/models``, ``POST /v1/completions`` and
``POST /v1/chat/completions`` (``stream`` as server-sent events), plus ``GET /health``. The
adapter comes with the model name: ``gemma3-270m:sensor`` is the base model with the adapter
loaded as ``sensor``; the ``adapters`` field (``{"sensor": 0.5}``) is an extension for scales
and sets of adapters.

All requests share one engine, and one worker thread runs their generations in arrival order
(with ``--parallel N``, up to N requests at a time, continuously batched where the backend
has batches): a request never sees another's adapters or KV cache, and the event loop is
never blocked by the model. A client that disconnects cancels its generation at the next
token.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import math
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

try:
    import anyio
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, Field
    from sse_starlette import EventSourceResponse
    from starlette.exceptions import HTTPException
    from starlette.types import ASGIApp, Message, Receive, Scope, Send
except ModuleNotFoundError as exc:  # the server is an optional extra
    raise ModuleNotFoundError(
        f"edgegemma serve needs {exc.name}: pip install 'edgegemma[serve]'", name=exc.name
    ) from None

from . import __version__
from .adapters.option import AdapterGrammar
from .engine import (
    ENGINE_ADAPTERS,
    OVERFLOW_POLICIES,
    PREFIX_CACHE_POLICIES,
    Engine,
    Result,
    Stream,
    load,
)
from .errors import (
    AdapterError,
    BackendUnavailableError,
    ContextOverflowError,
    EdgeGemmaError,
    InvalidParameterError,
)
from .models import default_model, looks_like_a_name

_ADAPTER = AdapterGrammar(scale=False)
"""``--adapter`` of serve: each request sets the scales of the adapters it uses."""

DEFAULT_PORT = 8080
MAX_BODY_BYTES = 4 << 20
"""Requests larger than this are refused with 413 (a 32k-token prompt is ~130 KB)."""
_FINISH = {"stop": "stop", "length": "length", "timeout": "length", "cancelled": "stop"}


# -- errors ------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = (
            status,
            message,
            kind,
            code,
            param,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _api_error(exc: EdgeGemmaError) -> APIError:
    """The HTTP answer to an engine error: the request's fault (4xx) unless the model failed."""
    if isinstance(exc, ContextOverflowError):
        return APIError(400, str(exc), code="context_length_exceeded", param="messages")
    if isinstance(exc, (InvalidParameterError, BackendUnavailableError)):
        return APIError(400, str(exc), code="invalid_value")
    if isinstance(exc, AdapterError):
        return APIError(404, str(exc), code="model_not_found", param="model")
    return APIError(500, str(exc), kind="server_error", code="engine_error")


# -- requests ----------------------------------------------------------------------------


class _Strict(BaseModel):
    # Unknown fields and wrong types are refused, as the OpenAI API does, instead of being
    # silently ignored or coerced.
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaFormat(_Strict):
    name: str
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Extensions (llama-server has the same sampling ones).
    top_k: int = 40
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    adapters: dict[str, float] | None = None
    """The adapter set by name and scale; with a base model name only."""

    def check_unsupported(self) -> None:
        if self.n != 1:
            raise APIError(400, "only n=1 is supported", code="invalid_value", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0.0:
                raise APIError(
                    400,
                    f"{name} is not supported; use repeat_penalty (an extension) instead",
                    code="invalid_value",
                    param=name,
                )
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported", code="invalid_value")
        if self.stream_options is not None and not self.stream:
            raise APIError(
                400, "stream_options needs stream=true", code="invalid_value", param="stream"
            )

    def options(self) -> dict[str, Any]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repeat_penalty": self.repeat_penalty,
            "seed": self.seed,
            "stop": stops,
        }


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.echo or self.suffix is not None or self.best_of not in (None, 1):
            raise APIError(400, "echo, suffix and best_of are not supported", code="invalid_value")

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the request: one text, one list of token ids, or several texts."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompts: list[str | list[int]] = [prompt]
        else:
            prompts = list(prompt)  # type: ignore[arg-type]
        if not prompts:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if self.stream and len(prompts) != 1:
            raise APIError(400, "a streamed completion takes one prompt", param="prompt")
        return prompts


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(
                400, "top_logprobs needs logprobs=true", code="invalid_value", param="logprobs"
            )

    def options(self) -> dict[str, Any]:
        options = super().options()
        if self.max_completion_tokens is not None:
            options["max_tokens"] = self.max_completion_tokens
        if self.logprobs:
            options["logprobs"] = self.top_logprobs or 0
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            options["json_schema"] = {"type": "object"}
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise APIError(
                    400,
                    'response_format of type "json_schema" needs a json_schema object',
                    param="response_format",
                )
            options["json_schema"] = fmt.json_schema.schema_
        return options


# -- generations -------------------------------------------------------------------------


class _Run:
    """One generation on the engine's worker thread; its Result (and, with ``pieces``, each
    text piece) reaches the event loop through a queue. :meth:`cancel` ends it at the next
    token.

    Without ``pieces`` the event loop is not woken per token: on a small device its thread
    would take CPU time from the model's threads (measured: +0.3 ms per token).
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
        self._waiting: list[_Run] = []
        self._waiting_lock = threading.Lock()
        self.created = int(time.time())
        self.generations: Counter[str] = Counter()
        """Generations run, by finish reason (``cancelled``: the client left)."""

    def submit(self, run: _Run) -> None:
        with self._waiting_lock:
            self._waiting.append(run)
        # One turn of the worker per run: a turn whose run an earlier turn already took
        # finds it gone and takes the runs that arrived since, or none.
        self.executor.submit(self._turn)

    def _turn(self) -> None:
        # Index in the run -> a request not answered yet and its stream: under steady load the
        # run goes on, so it holds only those.
        live: dict[int, tuple[_Run, Stream]] = {}

        def take(count: int) -> list[tuple[_Run, Stream]]:
            with self._waiting_lock:
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

    def model_ids(self) -> list[str]:
        return [self.model, *(f"{self.model}:{name}" for name in self.engine.adapters)]

    def adapters_for(self, request: _Sampling) -> Any:
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

    async def start(self, make: Callable[[], Stream]) -> tuple[_Run, str | Result | None]:
        """Start a streamed generation and wait for its first piece (or its Result), so that
        a request the engine refuses is answered with an error status before any of the
        response is sent."""
        run = _Run(self, make, pieces=True)
        try:
            first = await run.next()
        except EdgeGemmaError as exc:
            raise _api_error(exc) from None
        except BaseException:
            await run.finish()
            raise
        return run, first


async def _collect(
    server: Server, makes: Sequence[Callable[[], Stream]], request: Request
) -> list[Result]:
    """The Results of generations whose client waits for the whole answer, run one after
    another. From the start a client that disconnects cancels the one running (at its next
    token), and those after it never start."""
    left = asyncio.Event()
    running: list[_Run] = []

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
            run = _Run(server, make, pieces=False)
            running[:] = [run]
            try:
                item = await run.next()
                while not isinstance(item, Result):
                    if item is None:
                        raise APIError(499, "the client closed the request", code="cancelled")
                    item = await run.next()
            except EdgeGemmaError as exc:
                raise _api_error(exc) from None
            finally:
                await run.finish()
            results.append(item)
        return results
    finally:
        watcher.cancel()


def _usage(results: Sequence[Result]) -> dict[str, int]:
    prompt = sum(r.stats.prompt_tokens for r in results)
    completion = sum(r.stats.completion_tokens for r in results)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _timings(result: Result) -> dict[str, float]:
    """The engine's own figures for the request, under llama-server's names."""
    stats = result.stats
    return {
        "prompt_n": stats.prompt_tokens - stats.cached_tokens,
        "cache_n": stats.cached_tokens,
        "prompt_ms": stats.prefill_s * 1000,
        "prompt_per_second": stats.prefill_tps,
        "predicted_n": stats.completion_tokens,
        "predicted_ms": stats.decode_s * 1000,
        "predicted_per_second": stats.decode_tps,
        "total_ms": stats.total_s * 1000,
        "batch_n": stats.batch_size,
    }


def _chat_logprobs(result: Result) -> dict[str, Any] | None:
    if result.logprobs is None:
        return None

    def entry(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode())}

    return {
        "content": [
            {
                **entry(lp.text, lp.logprob),
                "top_logprobs": [entry(t.text, t.logprob) for t in lp.top],
            }
            for lp in result.logprobs
        ]
    }


def _completion_logprobs(result: Result) -> dict[str, Any] | None:
    if result.logprobs is None:
        return None
    offsets, at = [], 0
    for lp in result.logprobs:
        offsets.append(at)
        at += len(lp.text)
    return {
        "tokens": [lp.text for lp in result.logprobs],
        "token_logprobs": [_finite(lp.logprob) for lp in result.logprobs],
        "top_logprobs": [{t.text: _finite(t.logprob) for t in lp.top} for lp in result.logprobs],
        "text_offset": offsets,
    }


def _finite(value: float) -> float:
    # JSON has no -Infinity: a token the sampler ruled out gets the lowest float instead.
    return value if math.isfinite(value) else -3.4028234663852886e38


# -- the application ---------------------------------------------------------------------


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
"""The names a server bound to this machine only answers to (:class:`HostCheck`)."""
BODY_TIMEOUT_S = 30.0
"""Seconds a client has to send a whole request body."""


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")


class HostCheck:
    """Answers only requests whose ``Host`` names one of ``allowed`` (any port): a web page
    in the user's browser that rebinds its own DNS name to 127.0.0.1 sends its own name,
    and is refused with 403 instead of reading the completions of a local server."""

    def __init__(self, app: ASGIApp, allowed: Sequence[str]):
        self.app, self.allowed = app, {h.lower() for h in allowed}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").lower()
            name = host[1:].partition("]")[0] if host.startswith("[") else host.partition(":")[0]
            if name not in self.allowed:
                refused = APIError(
                    403,
                    f"Host {host!r} is not one this server answers to "
                    f"({', '.join(sorted(self.allowed))}; serve --allow-host adds one)",
                    code="host_not_allowed",
                ).response()
                await refused(scope, receive, send)
                return
        await self.app(scope, receive, send)


PENDING_BODIES = 16
"""How many full-size request bodies the server holds while they arrive, all clients
together: past that, a body is refused with 503 instead of growing memory without bound
(300 clients trickling 1 MB each held 300 MB)."""


class BodyLimit:
    """Refuses request bodies over ``limit`` bytes with 413, whether or not they declare a
    Content-Length, bodies not sent whole within ``timeout`` seconds with 408, and bodies
    that would take the bytes received but not yet complete, all requests together, past
    ``PENDING_BODIES`` times ``limit`` with 503. The body is read here, so the application
    never holds more than that, nor waits for it forever."""

    def __init__(self, app: ASGIApp, limit: int, timeout: float = BODY_TIMEOUT_S):
        self.app, self.limit, self.timeout = app, limit, timeout
        self.pending = 0
        """Bytes of bodies still arriving (one event loop: no lock needed)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            too_large = APIError(
                413, f"the request body is larger than {self.limit} bytes",
                code="request_too_large",
            ).response()  # fmt: skip
            await too_large(scope, receive, send)
            return
        chunks: list[bytes] = []
        try:
            if not await self._receive_body(scope, receive, send, chunks):
                return
        finally:
            self.pending -= sum(len(c) for c in chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # what follows the body: the client's disconnect
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _receive_body(
        self, scope: Scope, receive: Receive, send: Send, chunks: list[bytes]
    ) -> bool:
        """Read the body into ``chunks``; False after answering a refusal (or a client gone)."""
        too_large = APIError(
            413, f"the request body is larger than {self.limit} bytes", code="request_too_large"
        ).response()
        size = 0
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                slow = APIError(
                    408, f"the request body did not arrive within {self.timeout:g} s",
                    code="request_timeout",
                ).response()  # fmt: skip
                await slow(scope, receive, send)
                return False
            if message["type"] != "http.request":
                return False  # the client left before it finished sending
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await too_large(scope, receive, send)
                return False
            if self.pending + len(chunk) > PENDING_BODIES * self.limit:
                busy = APIError(
                    503, "the server is receiving too many request bodies; retry",
                    kind="server_error", code="server_busy",
                ).response()  # fmt: skip
                await busy(scope, receive, send)
                return False
            self.pending += len(chunk)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return True


def create_app(
    engine: Engine,
    *,
    model: str,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    parallel: int = 1,
    allowed_hosts: Sequence[str] | None = LOOPBACK_HOSTS,
    body_timeout: float = BODY_TIMEOUT_S,
) -> FastAPI:
    """The ASGI application serving ``engine`` under the model name ``model``; up to
    ``parallel`` requests run together. Only requests whose ``Host`` is one of
    ``allowed_hosts`` are answered (None: any, for a server reached by names not known in
    advance)."""
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise InvalidParameterError(f"parallel must be a positive integer, got {parallel!r}")
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
        raise InvalidParameterError("the API key must be a non-empty string (or None: no key)")
    for name, value in (("max_body_bytes", max_body_bytes), ("body_timeout", body_timeout)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise InvalidParameterError(f"{name} must be a positive number, got {value!r}")
    server = Server(engine, model, api_key, parallel)
    app = FastAPI(
        title="edgegemma",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.server = server
    app.add_middleware(BodyLimit, limit=max_body_bytes, timeout=body_timeout)
    if allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed=allowed_hosts)

    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first.get("type") == "json_invalid":
            message, where = f"the request body is not valid JSON: {first.get('msg', '')}", []
        elif first.get("type") == "extra_forbidden":
            message = f"unrecognized request argument supplied: {'.'.join(where)}"
        elif not where:
            message = "the request body must be a JSON object (Content-Type: application/json)"
        else:
            message = f"{'.'.join(where)}: {first.get('msg', 'invalid value')}"
        return APIError(400, message, param=".".join(where) or None).response()

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), code=code).response()

    @app.exception_handler(Exception)
    async def internal(_request: Request, exc: Exception) -> JSONResponse:
        return APIError(
            500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error"
        ).response()

    async def authorized(request: Request) -> None:  # async: no thread hop per request
        if server.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.encode(), server.api_key.encode()
        ):
            raise APIError(
                401,
                "missing or wrong API key: send it as 'Authorization: Bearer KEY'",
                kind="authentication_error",
                code="invalid_api_key",
            )

    guarded = [Depends(authorized)]

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": server.model,
            "backend": engine.backend_name,
            "parallel": server.parallel,
            "prefix_cache": engine.prefix_cache,
            "generations": dict(server.generations),
        }

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(server, i) for i in server.model_ids()]}

    @app.get("/v1/models/{model_id:path}", dependencies=guarded)
    async def model_card(model_id: str) -> dict[str, Any]:
        if model_id not in server.model_ids():
            raise APIError(404, f"the model {model_id!r} does not exist", code="model_not_found")
        return _model_card(server, model_id)

    @app.post("/v1/completions", dependencies=guarded, response_model=None)
    async def completions(
        body: CompletionRequest, request: Request
    ) -> JSONResponse | EventSourceResponse:
        body.check_unsupported()
        if body.stream and body.logprobs is not None:
            # A streamed piece is text, not a token: its logprobs would not line up.
            raise APIError(400, "logprobs are only returned with stream=false", param="logprobs")
        adapters = server.adapters_for(body)
        options = {**body.options(), "adapters": adapters, "logprobs": body.logprobs}
        prompts = body.prompts()
        ident, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(text: str, finish: str | None, index: int = 0) -> dict[str, Any]:
            return {
                "id": ident,
                "object": "text_completion",
                "created": created,
                "model": body.model,
                "choices": [
                    {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
                ],
            }

        if body.stream:
            run, first = await server.start(lambda: engine.stream(prompts[0], **options))

            async def events() -> AsyncIterator[dict[str, Any] | str]:
                async for kind, value in _stream_items(run, first):
                    if kind == "piece":
                        yield json.dumps(chunk(value, None))
                    elif kind == "result":
                        yield json.dumps(chunk("", _FINISH[value.finish_reason]))
                        if body.stream_options and body.stream_options.include_usage:
                            yield json.dumps(
                                {**chunk("", None), "choices": [], "usage": _usage([value])}
                            )
                    else:
                        yield json.dumps(value)
                yield "[DONE]"

            return EventSourceResponse(events(), ping=15)

        results = await _collect(
            server,
            [lambda prompt=prompt: engine.stream(prompt, **options) for prompt in prompts],  # type: ignore[misc]
            request,
        )
        return JSONResponse(
            {
                "id": ident,
                "object": "text_completion",
                "created": created,
                "model": body.model,
                "system_fingerprint": _fingerprint(engine),
                "choices": [
                    {
                        "index": i,
                        "text": r.text,
                        "logprobs": _completion_logprobs(r),
                        "finish_reason": _FINISH[r.finish_reason],
                    }
                    for i, r in enumerate(results)
                ],
                "usage": _usage(results),
                **({"timings": _timings(results[0])} if len(results) == 1 else {}),
            }
        )

    @app.post("/v1/chat/completions", dependencies=guarded, response_model=None)
    async def chat_completions(
        body: ChatCompletionRequest, request: Request
    ) -> JSONResponse | EventSourceResponse:
        body.check_unsupported()
        adapters = server.adapters_for(body)
        options = {**body.options(), "adapters": adapters}
        if body.stream and body.logprobs:
            raise APIError(400, "logprobs are only returned with stream=false", param="logprobs")
        messages: list[Any] = [m.model_dump(exclude_none=True) for m in body.messages]
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:
            run, first = await server.start(lambda: engine.stream_chat(messages, **options))

            def chunk(delta: dict[str, str], finish: str | None) -> dict[str, Any]:
                return {
                    "id": ident,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": body.model,
                    "system_fingerprint": _fingerprint(engine),
                    "choices": [
                        {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                    ],
                }

            async def events() -> AsyncIterator[dict[str, Any] | str]:
                yield json.dumps(chunk({"role": "assistant", "content": ""}, None))
                async for kind, value in _stream_items(run, first):
                    if kind == "piece":
                        yield json.dumps(chunk({"content": value}, None))
                    elif kind == "result":
                        yield json.dumps(chunk({}, _FINISH[value.finish_reason]))
                        if body.stream_options and body.stream_options.include_usage:
                            yield json.dumps(
                                {**chunk({}, None), "choices": [], "usage": _usage([value])}
                            )
                    else:
                        yield json.dumps(value)
                yield "[DONE]"

            return EventSourceResponse(events(), ping=15)

        [result] = await _collect(
            server, [lambda: engine.stream_chat(messages, **options)], request
        )
        return JSONResponse(
            {
                "id": ident,
                "object": "chat.completion",
                "created": created,
                "model": body.model,
                "system_fingerprint": _fingerprint(engine),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": result.text},
                        "logprobs": _chat_logprobs(result),
                        "finish_reason": _FINISH[result.finish_reason],
                    }
                ],
                "usage": _usage([result]),
                "timings": _timings(result),
            }
        )

    return app


async def _stream_items(run: _Run, first: str | Result | None) -> AsyncIterator[tuple[str, Any]]:
    """("piece", text)..., then ("result", Result), or ("error", body) for an engine error
    after the response has started. The generation is cancelled if the client leaves."""
    try:
        item = first
        while item is not None:
            if isinstance(item, Result):
                yield "result", item
                return
            yield "piece", item
            try:
                item = await run.next()
            except EdgeGemmaError as exc:
                yield "error", _api_error(exc).body()
                return
    finally:
        await run.finish()


def _model_card(server: Server, model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": server.created, "owned_by": "edgegemma"}


def _fingerprint(engine: Engine) -> str:
    return f"edgegemma-{__version__}-{engine.backend_name}"


# -- the command -------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgegemma serve",
        description="Serve a model and its adapters over the OpenAI HTTP API.",
        epilog="The adapter NAME is used as MODEL:NAME, e.g. gemma3-270m:sensor.",
    )
    parser.add_argument("--model", default=None, help="models.lock name or file path")
    parser.add_argument("--backend", help="default: chosen from the model file")
    parser.add_argument(
        "--name", help="the model id clients send (default: the model's name or file stem)"
    )
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar=_ADAPTER.metavar,
        help="load an adapter, served as MODEL:NAME (repeatable; each request sets its scale)",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="default: %(default)s (this machine only)"
    )
    parser.add_argument(
        "--port", type=_port, default=DEFAULT_PORT, help="0-65535 (default: %(default)s)"
    )
    parser.add_argument(
        "--api-key", type=_api_key, help="require 'Authorization: Bearer KEY' on /v1"
    )
    parser.add_argument(
        "--allow-host",
        action="append",
        metavar="NAME",
        help="answer requests whose Host is NAME (repeatable; default with a loopback --host: "
        f"{', '.join(LOOPBACK_HOSTS)}; with another --host: any)",
    )
    parser.add_argument(
        "--body-timeout",
        type=_positive(float),
        default=BODY_TIMEOUT_S,
        metavar="SECONDS",
        help="time a client has to send a request body (default: %(default)s)",
    )
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--threads", type=int, help="CPU threads (default: the free cores)")
    parser.add_argument("--on-overflow", choices=OVERFLOW_POLICIES, default="error")
    parser.add_argument(
        "--prefix-cache",
        choices=PREFIX_CACHE_POLICIES,
        default="exact",
        help="exact (default): reuse the KV cache only where the answer stays the fresh one; "
        "always: also the previous answer's tokens and under adapters (faster multi-turn chat)",
    )
    parser.add_argument(
        "--max-body-bytes", type=_positive(int), default=MAX_BODY_BYTES, help="default: %(default)s"
    )
    parser.add_argument(
        "--parallel",
        type=int,
        default=1,
        metavar="N",
        help="run up to N requests together (default: %(default)s, one at a time)",
    )
    parser.add_argument(
        "--log-level", default="warning", choices=("debug", "info", "warning", "error")
    )
    return parser


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """What to tell whoever starts a server others can reach without a key."""
    if is_loopback(host) or api_key is not None:
        return None
    return (
        f"serving on {host} without --api-key: anyone who can reach this machine can use the model"
    )


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 0 to 65535, got {text!r}")
    return int(text)


def _api_key(text: str) -> str:
    if not text.strip() or text != text.strip():
        raise argparse.ArgumentTypeError("the API key must be non-empty, without spaces around it")
    return text


def _positive(kind: Callable[[str], float]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0 or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
        return value

    return parse


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    options = _parser().parse_args(argv)
    allowed_hosts = options.allow_host or (LOOPBACK_HOSTS if is_loopback(options.host) else None)
    warning = exposure_warning(options.host, options.api_key)
    if warning:
        print(f"edgegemma serve: warning: {warning}", file=sys.stderr, flush=True)
    adapters = [_ADAPTER.parse(spec) for spec in options.adapter]
    model = options.model or default_model(options.backend)
    name = options.name or (model if looks_like_a_name(model) else Path(model).stem)
    if ":" in name:
        raise InvalidParameterError(f"the model id must not contain ':', got {name!r}")
    with load(
        options.model,
        backend=options.backend,
        n_ctx=options.n_ctx,
        n_threads=options.threads,
        on_overflow=options.on_overflow,
        prefix_cache=options.prefix_cache,
    ) as engine:
        for adapter in adapters:
            engine.load_adapter(adapter.name, adapter.path)
        app = create_app(
            engine,
            model=name,
            api_key=options.api_key,
            max_body_bytes=options.max_body_bytes,
            parallel=options.parallel,
            allowed_hosts=allowed_hosts,
            body_timeout=options.body_timeout,
        )
        config = uvicorn.Config(
            app,
            host=options.host,
            port=options.port,
            log_level=options.log_level,
            timeout_graceful_shutdown=5,
        )
        server = uvicorn.Server(config)
        ids = ", ".join(app.state.server.model_ids())
        print(
            f"edgegemma serve: http://{options.host}:{options.port}/v1 ({engine.backend_name}; "
            f"models: {ids})",
            file=sys.stderr,
            flush=True,
        )
        server.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
