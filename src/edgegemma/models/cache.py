"""The local cache of fetched models, under :func:`edgegemma.locations.home`: each model's
artifact beside the pin it was verified against; checking a hit costs a stat, not a hash."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import ModelError
from ..files import locked, sha256_and_stat, write_atomically
from ..locations import home, lock_path, read_text
from ..recipes import gguf_options
from .lock import LockEntry, lookup, read_lock

log = logging.getLogger("edgegemma")

Status = Literal["ok", "missing", "mismatch", "unpinned"]


@dataclass(frozen=True)
class VerifyResult:
    """What :func:`verify` found for one model."""

    name: str
    status: Status
    """ok; missing (not fetched); mismatch; unpinned (cached, but no hash to check against)."""
    path: Path
    expected_sha256: str | None = None
    actual_sha256: str | None = None
    expected_size: int | None = None
    actual_size: int | None = None


@dataclass(frozen=True)
class Pin:
    """pin.json: what the cached artifact was verified against, and when."""

    origin: str
    sha256: str
    size: int
    revision: str | None
    """The commit an hf file was downloaded at; None for pypi or when unknown."""
    stat_key: tuple[int, int, int, int] | None
    """(size, mtime_ns, ctime_ns, inode) of the artifact when it was last hashed."""


@dataclass(frozen=True)
class Expected:
    sha256: str
    size: int | None
    by: str
    """Who pins it, for messages."""


def model_dir(name: str) -> Path:
    return home() / "models" / name


def verify(name: str | None = None) -> list[VerifyResult]:
    """Re-hash the cached artifact of one model, or of every model in the lock file."""
    entries = read_lock()
    chosen = [lookup(entries, name)] if name is not None else list(entries.values())
    try:
        return [
            _verify_variant(entry, entries[str(entry.base)])
            if entry.source == "quantize"
            else _verify(entry)
            for entry in chosen
        ]
    except OSError as exc:
        raise ModelError(f"cannot read the model cache {home()}: {exc}") from exc


def _verify(entry: LockEntry) -> VerifyResult:
    folder = model_dir(entry.name)
    target = folder / entry.artifact
    if not target.is_file():
        return VerifyResult(entry.name, "missing", target)
    with model_locked(folder, entry.name):
        if not target.is_file():
            return VerifyResult(entry.name, "missing", target)
        record = read_pin(folder)
        expected = expected_pin(entry, record)
        sha256, size, stat_key = hash_file(target)
        if expected is None:
            return VerifyResult(entry.name, "unpinned", target, None, sha256, None, size)
        result = VerifyResult(
            entry.name, "ok", target, expected.sha256, sha256, expected.size, size
        )
        if sha256 == expected.sha256 and (expected.size is None or size == expected.size):
            write_pin(folder, repin(entry, record, sha256, size, stat_key))
            return result
        if record is not None:
            # Make the next fetch re-hash it (and so replace it) even if its stat is unchanged.
            write_pin(folder, dataclasses.replace(record, stat_key=None))
        return dataclasses.replace(result, status="mismatch")


def _verify_variant(entry: LockEntry, base: LockEntry) -> VerifyResult:
    target = variant_build(entry, base)
    if target is None:
        return VerifyResult(entry.name, "missing", model_dir(entry.name) / entry.artifact)
    sha256, size, _ = hash_file(target)
    pinned, pinned_size = entry.build_pin()
    if pinned is None:
        return VerifyResult(entry.name, "unpinned", target, None, sha256, None, size)
    ok = sha256 == pinned and (pinned_size is None or size == pinned_size)
    return VerifyResult(
        entry.name, "ok" if ok else "mismatch", target, pinned, sha256, pinned_size, size
    )


def variant_options(entry: LockEntry) -> dict[str, str]:
    embedding = None if entry.embedding == "recipe" else entry.embedding
    return gguf_options(str(entry.quant), embedding, entry.importance)


def variant_build(entry: LockEntry, base: LockEntry) -> Path | None:
    """The build file of a quantize entry if it is in the cache (by names and sizes), else None.

    Costs no hashing: the base's sha256 is the one the lock pins (or its first-fetch pin).
    """
    from ..builds import build_path, verify_build
    from ..quantize import FILE, build_key

    source_sha256 = base.sha256 or (pin.sha256 if (pin := read_pin(model_dir(base.name))) else None)
    if source_sha256 is None:
        return None
    folder = build_path("gguf", build_key(source_sha256, variant_options(entry)))
    return folder / FILE if verify_build(folder, hashes=False) else None


def expected_pin(entry: LockEntry, record: Pin | None) -> Expected | None:
    if entry.sha256 is not None:
        return Expected(entry.sha256, entry.size, f"the lock file {lock_path()}")
    if record is not None and record.origin == entry.origin:
        where = model_dir(entry.name) / "pin.json"
        return Expected(record.sha256, record.size, f"the pin recorded on first fetch ({where})")
    return None


def is_cached(entry: LockEntry, target: Path, record: Pin | None) -> bool:
    """Whether the artifact is the pinned one, judged by its stat alone."""
    expected = expected_pin(entry, record)
    if record is None or expected is None or record.sha256 != expected.sha256:
        return False
    # The record is read before the stat: a fetch renames the artifact before it writes the record,
    # so an old pin never vouches for a new file.
    try:
        return record.stat_key == file_stat_key(target.stat())
    except FileNotFoundError:
        return False


def rehash_cached(entry: LockEntry, target: Path, record: Pin | None) -> bool:
    """Whether the artifact is the pinned one, by its hash; a changed one is deleted."""
    expected = expected_pin(entry, record)
    if expected is None or not target.is_file():
        return False
    sha256, size, stat_key = hash_file(target)
    if sha256 != expected.sha256 or (expected.size is not None and size != expected.size):
        log.warning(
            "%s: the cached %s has sha256 %s (%d bytes) but %s pins %s; "
            "deleting it and fetching it again",
            entry.name, target, sha256, size, expected.by, expected.sha256,
        )  # fmt: skip
        target.unlink()
        return False
    write_pin(target.parent, repin(entry, record, sha256, size, stat_key))
    return True


def repin(
    entry: LockEntry,
    record: Pin | None,
    sha256: str,
    size: int,
    stat_key: tuple[int, int, int, int],
) -> Pin:
    """The pin for an artifact just hashed, keeping the commit if it is the same file."""
    revision = record.revision if record is not None and record.sha256 == sha256 else None
    origin = record.origin if record is not None and record.sha256 == sha256 else entry.origin
    return Pin(origin, sha256, size, revision, stat_key)


def hash_file(path: Path) -> tuple[str, int, tuple[int, int, int, int]]:
    """sha256, size and stat key of a file, the stat taken from the very file hashed."""
    digest, info = sha256_and_stat(path)
    return digest, info.st_size, file_stat_key(info)


def model_locked(folder: Path, name: str) -> AbstractContextManager[None]:
    """One fetch or verify of a model at a time."""
    return locked(
        folder / ".lock",
        waiting=lambda: log.info("%s is being fetched by another process; waiting", name),
    )


def file_stat_key(info: os.stat_result) -> tuple[int, int, int, int]:
    # ctime catches an edit whose mtime was set back; the inode catches a file swapped in.
    return (info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino)


def read_pin(folder: Path) -> Pin | None:
    path = folder / "pin.json"
    try:
        data = json.loads(read_text(path))
        key = data["stat_key"]
        return Pin(
            origin=str(data["origin"]),
            sha256=str(data["sha256"]),
            size=int(data["size"]),
            revision=None if data["revision"] is None else str(data["revision"]),
            stat_key=None if key is None else (int(key[0]), int(key[1]), int(key[2]), int(key[3])),
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        log.warning("ignoring the unreadable pin record %s (%s)", path, exc)
        return None


def write_pin(folder: Path, record: Pin) -> None:
    write_atomically(folder / "pin.json", json.dumps(dataclasses.asdict(record), indent=2) + "\n")
