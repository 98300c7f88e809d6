"""Writing, locking and hashing files: the one place edgegemma does each.

A write goes to a temporary name beside the target, is flushed to the disk, and is renamed
over the target in one step, then the folder holding it is flushed too: a reader never sees
half a file, and a gateway that loses power comes back with the old file or the new one,
never a finished-looking file of zeros (a rename can reach the disk before the data it names).
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from .locations import check_regular_file


def write_atomically(path: Path, data: str | bytes) -> Path:
    """Replace the file ``path`` with ``data`` (text is written as UTF-8), all or nothing,
    keeping the permissions of the file it replaces; return ``path``."""
    path = Path(path)
    with writing_atomically(path) as partial:
        partial.write_bytes(data.encode() if isinstance(data, str) else data)
        if path.exists():
            partial.chmod(stat.S_IMODE(path.stat().st_mode))
    return path


@contextmanager
def writing_atomically(target: Path) -> Iterator[Path]:
    """A temporary path beside ``target`` for the block to write; when the block ends
    without an error it replaces ``target`` durably, else it is removed. The path does not
    exist yet: the block creates it (with the permissions any new file gets)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.partial")
    try:
        yield partial
        replace_durably(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def replace_durably(source: Path, target: Path) -> None:
    """Rename the finished file or folder ``source`` over ``target`` (same file system) so
    that the rename and what it names survive a power cut."""
    _flush_tree(Path(source))
    os.replace(source, target)
    _flush(Path(target).parent)


def copy_atomically(source: Path, target: Path) -> Path:
    """Copy the file or folder ``source`` to ``target`` (replacing a file there; a folder
    there must not exist), all or nothing; return ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not source.is_dir():
        with writing_atomically(target) as partial:
            shutil.copyfile(source, partial)
        return target
    if target.exists():
        raise FileExistsError(f"{target} exists; name a new folder")
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        partial = scratch / "copy"
        shutil.copytree(source, partial)
        replace_durably(partial, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


@contextmanager
def locked(path: Path, *, waiting: Callable[[], object] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (flock on POSIX, a locked file on Windows)
    for the block; the operating system drops it if this process dies. ``waiting`` is called
    once if another process holds the lock, before waiting for it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if waiting is not None:
            waiting()
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def sha256_file(path: Path) -> str:
    """The sha256 of the regular file ``path``, read in blocks (models are gigabytes)."""
    return sha256_and_stat(path)[0]


def sha256_and_stat(path: Path) -> tuple[str, os.stat_result]:
    """The sha256 of the regular file ``path`` and the stat of the very file hashed (a file
    renamed over ``path`` meanwhile cannot pair its stat with another file's hash)."""
    check_regular_file(path)
    with open(path, "rb") as handle:
        info = os.fstat(handle.fileno())
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    return digest, info


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


def _flush_tree(path: Path) -> None:
    if path.is_dir():
        for folder, _, names in os.walk(path):
            for name in names:
                _flush(Path(folder) / name)
            _flush(Path(folder))
    else:
        _flush(path)


def _flush(path: Path) -> None:
    if os.name == "nt" and path.is_dir():
        return  # Windows cannot open a folder to flush it; NTFS journals the rename itself
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
