"""What the server checks before a request reaches a route: the Host it names and the size
and pace of its body."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .protocol import APIError

MAX_BODY_BYTES = 4 << 20
"""Requests larger than this are refused with 413: far above any prompt the context holds."""
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
together: past that, a body is refused with 503 instead of memory growing with the number
of clients that trickle bodies in."""


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
