"""Where edgegemma keeps its files: the cache home and the model lock file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import ModelError


def home() -> Path:
    """The cache directory: ``$EDGEGEMMA_HOME``, else ``~/.cache/edgegemma``."""
    configured = os.environ.get("EDGEGEMMA_HOME")
    if configured:
        return Path(configured).expanduser().absolute()
    return Path.home() / ".cache" / "edgegemma"


def lock_path() -> Path:
    """The lock file: ``$EDGEGEMMA_LOCK``, else the ``models.lock`` shipped in the package."""
    configured = os.environ.get("EDGEGEMMA_LOCK")
    if configured:
        return Path(configured).expanduser().absolute()
    return Path(__file__).with_name("models.lock")


def check_regular_file(path: Path) -> None:
    """Refuse a path that exists but is not a regular file: reading a FIFO or a device would
    block or never end. A missing file is left to the caller (``FileNotFoundError``)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise ModelError(f"{path} is {kind}; edgegemma expected a file there")


def read_text(path: Path) -> str:
    """The text of a small file edgegemma keeps (a lock file, a pin, a manifest)."""
    check_regular_file(path)
    return path.read_text(encoding="utf-8")
