"""Where edgegemma keeps its files: the cache home and the model lock file."""

from __future__ import annotations

import os
from pathlib import Path


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
