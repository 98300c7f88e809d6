"""The device's adapter store: verified packages, the version in use and the one before.

Layout, under ``$EDGEGEMMA_HOME/adapters`` unless told otherwise::

    NAME/state.json             {"current": "2", "previous": "1", "rolled_back": ["3"]}
    NAME/versions/VERSION/      a package that passed every check (manifest + adapter file)
    NAME/.partial-*/            a pull in progress; removed on failure, or by the next pull
                                when a killed process left it behind
    NAME/.lock                  flock: one pull or rollback of NAME at a time
    .tuf/<repository>/          TUF's trusted metadata of each repository pulled from

A version folder is renamed into place only once complete and checked, and ``state.json``
is replaced in one atomic write after it: whatever moment a pull is killed at, ``current``
names a complete, verified package. A version folder no state names (a pull killed between
the two renames) is removed by the next install.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UpdateError
from ..files import locked, replace_durably, write_atomically
from ..locations import home
from .package import Manifest, check_file, check_name, read_package

STATE = "state.json"
PARTIAL_PREFIX = ".partial-"


@dataclass(frozen=True)
class StoreState:
    current: str | None = None
    previous: str | None = None
    rolled_back: tuple[str, ...] = field(default=())
    """Versions rolled back from: a pull does not install them again."""


@dataclass(frozen=True)
class InstalledAdapter:
    name: str
    version: str
    folder: Path
    manifest: Manifest

    def file(self, fmt: str = "gguf") -> Path:
        """The installed adapter file in the format ``fmt``."""
        return self.folder / self.manifest.file_for(fmt)


def default_store() -> Path:
    return home() / "adapters"


class Store:
    """The adapter store at ``root`` (default :func:`default_store`)."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else default_store()

    def folder(self, name: str) -> Path:
        return self.root / check_name(name)

    @contextmanager
    def locked(self, name: str) -> Iterator[None]:
        """Hold ``name`` for one pull or rollback; leftovers of killed pulls are removed."""
        folder = self.folder(name)
        with locked(folder / ".lock"):
            for leftover in folder.glob(f"{PARTIAL_PREFIX}*"):
                shutil.rmtree(leftover, ignore_errors=True)
            yield

    def scratch(self, name: str) -> Path:
        """A new empty folder beside the versions (same file system: it is renamed into
        place), for a pull under way; the caller removes it unless it is installed."""
        folder = self.folder(name)
        folder.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{PARTIAL_PREFIX}{os.getpid()}-", dir=folder))

    def state(self, name: str) -> StoreState:
        path = self.folder(name) / STATE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return StoreState()
        except (OSError, ValueError) as exc:
            raise UpdateError(f"{path} cannot be read: {exc}") from None
        return StoreState(data.get("current"), data.get("previous"), tuple(data["rolled_back"]))

    def installed(self, name: str, *, which: str = "current") -> InstalledAdapter | None:
        """The installed version of ``name`` in use (or the ``previous`` one), or None."""
        version = getattr(self.state(name), which)
        if version is None:
            return None
        folder = self.folder(name) / "versions" / version
        return InstalledAdapter(name, version, folder, read_package(folder, verify=False))

    def install(self, name: str, version: str, package: Path) -> StoreState:
        """Move the checked package folder ``package`` (made by :meth:`scratch`) into place as
        ``version`` and make it current, the current one previous; call under :meth:`locked`."""
        before = self.state(name)
        versions = self.folder(name) / "versions"
        versions.mkdir(parents=True, exist_ok=True)
        target = versions / version
        if version in (before.current, before.previous):
            raise UpdateError(f"{name} {version} is installed already")
        if target.exists():  # left by a pull killed before it wrote the state
            shutil.rmtree(target)
        replace_durably(package, target)
        after = StoreState(version, before.current, before.rolled_back)
        self._write_state(name, after)
        self._prune(name, after)
        return after

    def rollback(self, name: str) -> StoreState:
        """Make the previous version current again; call under :meth:`locked`."""
        before = self.state(name)
        if before.previous is None or before.current is None:
            raise UpdateError(f"{name} has no previous version to roll back to")
        after = StoreState(before.previous, None, (*before.rolled_back, before.current))
        self._write_state(name, after)
        self._prune(name, after)
        return after

    def problems(self, name: str) -> list[str]:
        """What is wrong with ``name``'s installed versions: a state naming a missing or
        altered one. Empty when consistent. (A partial folder a killed pull left is no
        fault: nothing names it, and the next pull removes it.)"""
        found = []
        state = self.state(name)
        folder = self.folder(name)
        for version in (state.current, state.previous):
            if version is None:
                continue
            package = folder / "versions" / version
            try:
                manifest = read_package(package, verify=False)
                if manifest.version != version:
                    found.append(f"{package} holds version {manifest.version}")
                for file, entry in manifest.files.items():
                    if (package / file).exists():
                        check_file(package / file, entry)
            except UpdateError as exc:
                found.append(str(exc))
        return found

    def _write_state(self, name: str, state: StoreState) -> None:
        record = {
            "current": state.current,
            "previous": state.previous,
            "rolled_back": list(state.rolled_back),
        }
        write_atomically(self.folder(name) / STATE, json.dumps(record, indent=1) + "\n")

    def _prune(self, name: str, state: StoreState) -> None:
        keep = {state.current, state.previous}
        for version in (self.folder(name) / "versions").iterdir():
            if version.name not in keep:
                shutil.rmtree(version, ignore_errors=True)
