"""Files written so that a reader never sees half of one: into a temporary name beside the
target, flushed to disk, then renamed over it in one step."""

from __future__ import annotations

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
