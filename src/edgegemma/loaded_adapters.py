"""The adapters an engine has loaded: their names, the calls using each, and when one may be
freed."""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .backends.base import AdapterHandle
from .errors import AdapterError, InvalidParameterError
from .sampling import check_float32


@dataclass(eq=False)
class LoadedAdapter:
    """An adapter the engine loaded, as calls hold it: it outlives its name until the last
    call made with it ends."""

    uid: int
    name: str
    path: Path
    handle: AdapterHandle
    users: int = 0
    """Calls made with it that have not ended: it is freed only when none is left."""
    unloaded: bool = False


Bound = list[tuple[LoadedAdapter, float]]
"""The loaded adapters a call runs with, and their scales."""


def adapter_file(name: object, path: object) -> Path:
    """The adapter file ``path`` names, checked with the ``name`` it is to be loaded under."""
    if not isinstance(name, str) or not name:
        raise InvalidParameterError(f"adapter name must be a non-empty string, got {name!r}")
    if not isinstance(path, (str, os.PathLike)) or path == "":
        raise InvalidParameterError(f"adapter path must be a file path, got {path!r}")
    if not Path(path).is_file():
        raise AdapterError(f"adapter file not found: {path}")
    return Path(path)


class LoadedAdapters:
    """Loaded adapters by name. An adapter is freed only once it is unloaded *and* no call
    made with it is still running: unloading frees the name at once, and the adapter waits
    among the doomed for its last user. Safe to call from any thread; freeing the doomed
    (:meth:`take_doomed`) is the engine's, under its lock."""

    def __init__(self) -> None:
        self._by_name: dict[str, LoadedAdapter] = {}
        self._doomed: list[LoadedAdapter] = []
        self._uids = itertools.count(1)
        self._mutex = threading.Lock()

    def paths(self) -> dict[str, Path]:
        return {name: a.path for name, a in self._by_name.items()}

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def add(self, name: str, path: Path, handle: AdapterHandle) -> None:
        with self._mutex:
            self._by_name[name] = LoadedAdapter(next(self._uids), name, path, handle)

    def remove(self, name: str, active: Mapping[str, float]) -> None:
        """Unload ``name`` (not in the ``active`` set); it is doomed once nobody uses it."""
        with self._mutex:
            loaded = self._by_name.get(name)
            if loaded is None:
                raise AdapterError(f"no adapter named {name!r} is loaded")
            if name in active:
                raise AdapterError(
                    f"adapter {name!r} is in the active set {dict(active)}; "
                    "call set_adapters() without it first"
                )
            del self._by_name[name]
            loaded.unloaded = True
            if loaded.users == 0:
                self._doomed.append(loaded)

    def replace(self, name: str, path: Path, handle: AdapterHandle) -> None:
        """Bind ``name`` to a new adapter, in one step under the mutex: a call binds either the
        old one or the new, never a mix. The old is doomed once nobody uses it, as if
        unloaded; the name keeps its place in any active set."""
        with self._mutex:
            old = self._by_name.get(name)
            if old is None:
                raise self._unknown(name)
            self._by_name[name] = LoadedAdapter(next(self._uids), name, path, handle)
            old.unloaded = True
            if old.users == 0:
                self._doomed.append(old)

    def checked(self, adapters: object) -> dict[str, float]:
        """``adapters`` (``{name: scale}`` or None) as a call's adapter set: names loaded,
        scales C floats, zero scales left out (that adapter is then not applied at all)."""
        if adapters is None:
            return {}
        if not isinstance(adapters, Mapping):
            raise InvalidParameterError(
                f"adapters must be a mapping of name to scale or None, got {adapters!r}"
            )
        checked: dict[str, float] = {}
        for name, scale in adapters.items():
            if not isinstance(name, str) or name not in self._by_name:
                raise self._unknown(name)
            # Runtimes take the scale as a C float: 1e39 passes isfinite() but is infinite there.
            check_float32("adapter scale", scale)
            if scale != 0:
                checked[name] = float(scale)
        return checked

    def bind(self, adapters: Mapping[str, float]) -> Bound:
        """The loaded adapters ``adapters`` names now, kept alive until :meth:`unbind`."""
        with self._mutex:
            bound = []
            for name, scale in adapters.items():
                loaded = self._by_name.get(name)
                if loaded is None:
                    raise self._unknown(name)
                bound.append((loaded, scale))
            for loaded, _ in bound:
                loaded.users += 1
            return bound

    def unbind(self, bound: Bound) -> None:
        with self._mutex:
            for loaded, _ in bound:
                loaded.users -= 1
                if loaded.unloaded and loaded.users == 0:
                    self._doomed.append(loaded)

    @property
    def any_doomed(self) -> bool:
        return bool(self._doomed)

    def take_doomed(self) -> list[LoadedAdapter]:
        """The unloaded adapters no call uses any more, for the engine to free."""
        with self._mutex:
            doomed, self._doomed = self._doomed, []
            return doomed

    def clear(self) -> None:
        """Forget every adapter (the backend that held them is closed)."""
        with self._mutex:
            self._by_name.clear()
            self._doomed.clear()

    def misnamed(self, name: str, replacing: bool) -> AdapterError:
        """The error for loading under a taken name, or replacing one not loaded."""
        if replacing:
            return self._unknown(name)
        return AdapterError(f"an adapter named {name!r} is already loaded; unload it first")

    def _unknown(self, name: object) -> AdapterError:
        known = ", ".join(sorted(self._by_name)) or "none"
        return AdapterError(f"no adapter named {name!r} is loaded (loaded: {known})")
