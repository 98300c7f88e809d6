"""Files written so that a reader never sees half of one: into a temporary name beside the
target, flushed to disk, then renamed over it in one step."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path


def copy_atomically(source: Path, target: Path) -> Path:
    """Copy the file or folder ``source`` to ``target`` (replacing a file there; a folder
    there must not exist), all or nothing; return ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        if target.exists():
            raise FileExistsError(f"{target} exists; name a new folder")
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            partial = scratch / "copy"
            shutil.copytree(source, partial)
            os.replace(partial, target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return target
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with open(source, "rb") as reading, os.fdopen(handle, "wb") as writing:
            shutil.copyfileobj(reading, writing, 1 << 20)
            writing.flush()
            os.fsync(writing.fileno())
        os.replace(name, target)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return target


def no_space(error: BaseException, path: Path) -> str | None:
    """What to tell the user when ``error`` (or what caused it) is a full disk, else None."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return disk_full(path)
        seen = seen.__cause__ or seen.__context__
    return None


def disk_full(path: Path) -> str:
    """The words for a full disk at ``path``: where, and how much room is left."""
    where = Path(path)
    while not where.exists() and where.parent != where:
        where = where.parent
    free = shutil.disk_usage(where).free
    return f"no space left on the device holding {where} ({free / 1e6:.0f} MB free)"
