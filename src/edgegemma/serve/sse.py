"""Streamed answers as server-sent events, the same for completions and chat."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from sse_starlette import EventSourceResponse

from ..errors import EdgeGemmaError
from ..results import Result
from .protocol import FINISH, api_error, usage
from .worker import Run

Chunk = Callable[[str | None, str | None], dict[str, Any]]
"""A route's chunk of the stream from a piece of text (None: no text) and a finish reason."""


def event_stream(
    run: Run,
    first: str | Result | None,
    chunk: Chunk,
    *,
    include_usage: bool,
    opening: dict[str, Any] | None = None,
) -> EventSourceResponse:
    """The events of a started generation: ``opening`` if given, a chunk per piece, a chunk
    with the finish reason, the usage if asked for, then ``[DONE]``. An engine error after
    the response has started is sent as an event of its own, as the OpenAI API does."""

    async def events() -> AsyncIterator[str]:
        if opening is not None:
            yield json.dumps(opening)
        async for kind, value in _items(run, first):
            if kind == "piece":
                yield json.dumps(chunk(value, None))
            elif kind == "result":
                yield json.dumps(chunk(None, FINISH[value.finish_reason]))
                if include_usage:
                    yield json.dumps({**chunk(None, None), "choices": [], "usage": usage([value])})
            else:
                yield json.dumps(value)
        yield "[DONE]"

    return EventSourceResponse(events(), ping=15)


async def _items(run: Run, first: str | Result | None) -> AsyncIterator[tuple[str, Any]]:
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
                yield "error", api_error(exc).body()
                return
    finally:
        await run.finish()
