"""The ASGI application: the routes, the checks before them, and every error answered in
OpenAI's shape."""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from .. import __version__
from ..engine import Engine
from ..errors import InvalidParameterError
from .middleware import BODY_TIMEOUT_S, LOOPBACK_HOSTS, MAX_BODY_BYTES, BodyLimit, HostCheck
from .protocol import APIError
from .routes import api, router
from .worker import Server


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
    app = FastAPI(
        title="edgegemma",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.server = Server(engine, model, api_key, parallel)
    app.include_router(router)
    app.include_router(api)
    app.add_exception_handler(APIError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _invalid)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _internal)
    app.add_middleware(BodyLimit, limit=max_body_bytes, timeout=body_timeout)
    if allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed=allowed_hosts)
    return app


async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
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


async def _http_error(_request: Request, exc: HTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return APIError(exc.status_code, str(exc.detail), code=code).response()


async def _internal(_request: Request, exc: Exception) -> JSONResponse:
    return APIError(
        500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error"
    ).response()
