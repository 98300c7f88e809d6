"""Adapters served from a TUF repository: each verified new version swapped in while serving.

Every ``poll`` seconds the feed lists the adapters the repository publishes and pulls each
(:func:`edgegemma.adapters.pull.pull`: signatures, expiry, versions, hashes, the base model,
the engine's own checks and the acceptance set, before anything is installed). A version that
passes goes live through :meth:`Engine.replace_adapter`, run between two requests: requests
made before keep the old version, requests after get the new one. A version refused is logged
and shown in ``/health``; the version being served stays. ``edgegemma adapters rollback NAME`` makes the
store's previous version current, and the next poll serves it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..engine import Engine
from ..errors import EdgeGemmaError
from ..files import sha256_file

log = logging.getLogger("edgegemma.serve")


@dataclass(frozen=True)
class UpdateAttempt:
    """What the feed last did about a version it had not served yet."""

    at: float
    """Unix time."""
    adapter: str | None
    """None: the repository itself could not be read or verified."""
    version: str | None
    outcome: str
    """``installed`` (now served) or ``refused`` (the version served before stays)."""
    detail: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class AdapterFeed:
    """The adapters of the TUF repository at ``repo_url`` (``root``: its trusted root.json),
    kept in ``store`` and served by ``engine``."""

    def __init__(
        self,
        engine: Engine,
        repo_url: str,
        root: str | os.PathLike[str],
        *,
        store: str | os.PathLike[str] | None,
        poll: float,
        model: str | os.PathLike[str] | None,
        between_requests: Callable[[Callable[[], None]], None],
    ):
        from ..adapters.store import Store

        self._engine = engine
        self._url = repo_url
        self._root = Path(root)
        self._store = Store(store)
        self._poll = poll
        self._model = model
        self._between_requests = between_requests
        """Runs a swap where the server allows one: between two requests."""
        self.served: dict[str, tuple[str, str]] = {}
        """Adapter name -> (version, sha256 of its file) being served."""
        self.last: UpdateAttempt | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll_once(self) -> None:
        """List the repository's adapters, pull each, and serve every version that passed."""
        from ..adapters.pull import published

        try:
            names = published(self._url, self._root, store=self._store)
        except EdgeGemmaError as exc:
            self._note(None, None, "refused", str(exc))
            return
        for name in names:
            if self._stop.is_set():
                return
            self._update(name)

    def _update(self, name: str) -> None:
        from ..adapters.pull import pull

        try:
            pulled = pull(
                name,
                self._url,
                self._root,
                store=self._store,
                model=self._model,
                backend=self._engine.backend_name,
            )
        except EdgeGemmaError as exc:
            self._note(name, None, "refused", str(exc))
            return
        if pulled.path is None or self.served.get(name, ("",))[0] == pulled.version:
            return
        path = pulled.path

        def swap() -> None:
            if name in self._engine.adapters:
                self._engine.replace_adapter(name, path)
            else:
                self._engine.load_adapter(name, path)

        try:
            self._between_requests(swap)
        except EdgeGemmaError as exc:
            self._note(name, pulled.version, "refused", str(exc))
            return
        self.served[name] = (pulled.version, sha256_file(pulled.path))
        detail = f"serving {name} {pulled.version}" + (f" ({pulled.note})" if pulled.note else "")
        self._note(name, pulled.version, "installed", detail)

    def _note(self, name: str | None, version: str | None, outcome: str, detail: str) -> None:
        self.last = UpdateAttempt(time.time(), name, version, outcome, detail)
        level = logging.INFO if outcome == "installed" else logging.WARNING
        log.log(level, "adapter update %s: %s", outcome, detail)

    def start(self) -> None:
        """Poll in a thread from now on, every ``poll`` seconds."""
        self._thread = threading.Thread(target=self._run, name="edgegemma-adapter-feed")
        self._thread.daemon = True
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._poll):
            try:
                self.poll_once()
            except Exception as exc:  # noqa: BLE001 -- the feed must outlive one bad poll
                self._note(None, None, "refused", f"{type(exc).__name__}: {exc}")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
