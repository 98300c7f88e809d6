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

try:
    import anyio  # noqa: F401
    import fastapi  # noqa: F401
    import pydantic  # noqa: F401
    import sse_starlette  # noqa: F401
    import starlette  # noqa: F401
except ModuleNotFoundError as exc:  # the server is an optional extra
    raise ModuleNotFoundError(
        f"edgegemma serve needs {exc.name}: pip install 'edgegemma[serve]'", name=exc.name
    ) from None

from .app import create_app
from .cli import DEFAULT_PORT, exposure_warning, main
from .middleware import LOOPBACK_HOSTS, MAX_BODY_BYTES, is_loopback
from .protocol import APIError
from .worker import Server

__all__ = [
    "DEFAULT_PORT",
    "LOOPBACK_HOSTS",
    "MAX_BODY_BYTES",
    "APIError",
    "Server",
    "create_app",
    "exposure_warning",
    "is_loopback",
    "main",
]
