"""``edgegemma serve``: the command that loads a model and serves it."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..adapters.option import AdapterGrammar
from ..engine import load
from ..errors import InvalidParameterError
from ..models import default_model, looks_like_a_name
from ..options import OVERFLOW_POLICIES, PREFIX_CACHE_POLICIES
from ..threads import MAX_DEFAULT_THREADS
from .app import create_app
from .middleware import BODY_TIMEOUT_S, LOOPBACK_HOSTS, MAX_BODY_BYTES, is_loopback
from .updates import AdapterFeed

DEFAULT_PORT = 8080

_ADAPTER = AdapterGrammar(scale=False)
"""``--adapter`` of serve: each request sets the scales of the adapters it uses."""


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
    _ADAPTER.add_to(
        parser, "load an adapter, served as MODEL:NAME (repeatable; each request sets its scale)"
    )
    updates = parser.add_argument_group(
        "adapters from a TUF repository (edgegemma[updates]; docs/adapters.md)"
    )
    updates.add_argument(
        "--adapter-repo",
        metavar="URL",
        help="serve the newest verified version of every adapter this repository publishes",
    )
    updates.add_argument("--root", metavar="ROOT_JSON", help="the repository's trusted root.json")
    updates.add_argument(
        "--poll",
        type=_positive(float),
        default=60.0,
        metavar="SECONDS",
        help="look for new versions this often (default: %(default)s)",
    )
    updates.add_argument("--store", metavar="DIR", help="the adapter store (default: the cache's)")
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
    parser.add_argument(
        "--threads",
        type=int,
        help=f"CPU threads (default: the free cores, at most {MAX_DEFAULT_THREADS})",
    )
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
    if (options.adapter_repo is None) != (options.root is None):
        raise InvalidParameterError("--adapter-repo and --root go together")
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
        feed = None
        if options.adapter_repo is not None:
            feed = AdapterFeed(
                engine,
                options.adapter_repo,
                options.root,
                store=options.store,
                poll=options.poll,
                model=model,
                between_requests=app.state.server.between_requests,
            )
            feed.poll_once()  # the published adapters are there from the first request
            app.state.server.feed = feed
            feed.start()
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
        try:
            server.run()
        finally:
            if feed is not None:
                feed.stop()
    return 0
