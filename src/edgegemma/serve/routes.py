"""The HTTP routes: ``/health`` and the OpenAI API under ``/v1``. Each route is given the
server it answers for (:func:`current_server`), so that one module serves any app."""

from __future__ import annotations

import hmac
import time
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from .protocol import (
    FINISH,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    chat_logprobs,
    completion_logprobs,
    fingerprint,
    model_card,
    timings,
    usage,
)
from .sse import event_stream
from .worker import Server, collect


async def current_server(request: Request) -> Server:  # async: no thread hop per request
    """The server of the app that received ``request``."""
    server: Server = request.app.state.server
    return server


CurrentServer = Annotated[Server, Depends(current_server)]


async def authorized(request: Request, server: CurrentServer) -> None:
    """Refuse with 401 a request without the server's API key, where it has one."""
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


router = APIRouter()
"""``/health``, open to all."""
api = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])
"""The OpenAI API, behind the key."""


@router.get("/health")
async def health(server: CurrentServer) -> dict[str, Any]:
    return {
        "status": "ok",
        "model": server.model,
        "backend": server.engine.backend_name,
        "parallel": server.parallel,
        "prefix_cache": server.engine.prefix_cache,
        "generations": dict(server.generations),
        "adapter_update": (
            server.feed.last.to_json() if server.feed is not None and server.feed.last else None
        ),
    }


@api.get("/models")
async def models(server: CurrentServer) -> dict[str, Any]:
    cards = [model_card(server.created, i, **server.model_facts(i)) for i in server.model_ids()]
    return {"object": "list", "data": cards}


@api.get("/models/{model_id:path}")
async def one_model(model_id: str, server: CurrentServer) -> dict[str, Any]:
    if model_id not in server.model_ids():
        raise APIError(404, f"the model {model_id!r} does not exist", code="model_not_found")
    return model_card(server.created, model_id, **server.model_facts(model_id))


@api.post("/completions", response_model=None)
async def completions(
    body: CompletionRequest, request: Request, server: CurrentServer
) -> JSONResponse | EventSourceResponse:
    body.check_unsupported()
    if body.stream and body.logprobs is not None:
        # A streamed piece is text, not a token: its logprobs would not line up.
        raise APIError(400, "logprobs are only returned with stream=false", param="logprobs")
    engine = server.engine
    adapters = server.adapters_for(body)
    options = {**body.options(), "adapters": adapters, "logprobs": body.logprobs}
    prompts = body.prompts()
    ident, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
        return {
            "id": ident,
            "object": "text_completion",
            "created": created,
            "model": body.model,
            "choices": [
                {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            ],
        }

    if body.stream:
        run, first = await server.start(lambda: engine.stream(prompts[0], **options))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return event_stream(run, first, chunk, include_usage=include_usage)

    results = await collect(
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
            "system_fingerprint": fingerprint(engine),
            "choices": [
                {
                    "index": i,
                    "text": r.text,
                    "logprobs": completion_logprobs(r),
                    "finish_reason": FINISH[r.finish_reason],
                }
                for i, r in enumerate(results)
            ],
            "usage": usage(results),
            **({"timings": timings(results[0])} if len(results) == 1 else {}),
        }
    )


@api.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, server: CurrentServer
) -> JSONResponse | EventSourceResponse:
    body.check_unsupported()
    engine = server.engine
    adapters = server.adapters_for(body)
    options = {**body.options(), "adapters": adapters}
    if body.stream and body.logprobs:
        raise APIError(400, "logprobs are only returned with stream=false", param="logprobs")
    messages: list[Any] = [m.model_dump(exclude_none=True) for m in body.messages]
    ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if body.stream:
        run, first = await server.start(lambda: engine.stream_chat(messages, **options))

        def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
            return delta({} if text is None else {"content": text}, finish)

        def delta(content: dict[str, str], finish: str | None) -> dict[str, Any]:
            return {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": body.model,
                "system_fingerprint": fingerprint(engine),
                "choices": [
                    {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}
                ],
            }

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        opening = delta({"role": "assistant", "content": ""}, None)
        return event_stream(run, first, chunk, include_usage=include_usage, opening=opening)

    [result] = await collect(server, [lambda: engine.stream_chat(messages, **options)], request)
    return JSONResponse(
        {
            "id": ident,
            "object": "chat.completion",
            "created": created,
            "model": body.model,
            "system_fingerprint": fingerprint(engine),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "logprobs": chat_logprobs(result),
                    "finish_reason": FINISH[result.finish_reason],
                }
            ],
            "usage": usage([result]),
            "timings": timings(result),
        }
    )
