"""Adapter packages: adapter files plus the manifest that says what they are.

A package is a folder::

    manifest.json      name, version, base model, files, rank, targets, acceptance set
    adapter.gguf       one adapter file per format (gguf, onnx_adapter, lora), any subset

A folder rather than an archive: TUF signs and serves each file as its own target, so a
device downloads only the file its backend loads, and nothing needs unpacking (an archive's
paths are one more thing an attacker could aim at the file system).

``manifest.json``::

    {"format": "edgegemma-adapter-package/1", "name": "...", "version": "1.2",
     "base_model": {"name": "gemma3-270m", "sha256": "..."},
     "files": {"adapter.gguf": {"format": "gguf", "sha256": "...", "size": 123}},
     "rank": 8, "targets": ["blk.0.attn_q.weight", ...],
     "acceptance": {"min_score": 0.8, "max_tokens": 16,
                    "cases": [{"prompt": "...", "expected": "..."}]}}

``acceptance`` may be null. A case passes when the greedy answer, with surrounding blanks
stripped, starts with ``expected`` stripped the same way.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

from ..errors import EdgeGemmaError, UpdateError
from ..files import copy_atomically, replace_durably, sha256_file, write_atomically
from ..jsonl import parse_lines

MANIFEST = "manifest.json"
PACKAGE_FORMAT = "edgegemma-adapter-package/1"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_MANIFEST_BYTES = 1 << 20
"""A manifest longer than this is refused before it is parsed."""


@dataclass(frozen=True)
class PackageFile:
    format: str
    """An adapter format's name (:data:`edgegemma.adapters.FORMATS`)."""
    sha256: str
    size: int


@dataclass(frozen=True)
class AcceptanceCase:
    prompt: str
    expected: str


@dataclass(frozen=True)
class AcceptanceSet:
    cases: tuple[AcceptanceCase, ...]
    min_score: float = 1.0
    """The share of cases that must pass, 0 to 1."""
    max_tokens: int = 16


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    base_model: str
    """The name (or file name) of the base model the adapter was trained for."""
    base_sha256: str
    files: dict[str, PackageFile]
    rank: int
    targets: tuple[str, ...]
    acceptance: AcceptanceSet | None = None

    def to_json(self) -> str:
        record: dict[str, Any] = {
            "format": PACKAGE_FORMAT,
            "name": self.name,
            "version": self.version,
            "base_model": {"name": self.base_model, "sha256": self.base_sha256},
            "files": {name: asdict(f) for name, f in self.files.items()},
            "rank": self.rank,
            "targets": list(self.targets),
            "acceptance": None if self.acceptance is None else asdict(self.acceptance),
        }
        return json.dumps(record, indent=1) + "\n"

    def file_for(self, fmt: str) -> str:
        """The name of the package's file in the adapter format ``fmt``."""
        for name, entry in self.files.items():
            if entry.format == fmt:
                return name
        have = ", ".join(f.format for f in self.files.values())
        raise UpdateError(f"{self.name} {self.version} has no {fmt} adapter (it has: {have})")


def parse_version(text: str) -> Version:
    """A package version: PEP 440 (``1``, ``1.2``, ``2.0rc1``), so that newer is defined."""
    try:
        # The text names a folder in the store and a path in the repository: blanks that
        # PEP 440 would strip are refused rather than carried into file names.
        if text != text.strip():
            raise InvalidVersion(text)
        return Version(text)
    except InvalidVersion:
        raise UpdateError(
            f"adapter version {text!r} is not a PEP 440 version (such as 1, 1.2 or 2.0rc1)"
        ) from None


def check_name(name: str) -> str:
    """An adapter name that is also safe as one path component."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise UpdateError(
            f"adapter name {name!r} must be letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def parse_manifest(text: str | bytes, source: str = MANIFEST) -> Manifest:
    """A manifest from its JSON; :class:`UpdateError` says what is wrong with it."""
    if len(text) > MAX_MANIFEST_BYTES:
        raise UpdateError(f"{source} is longer than {MAX_MANIFEST_BYTES} bytes")
    try:
        data = json.loads(text)
        if data.get("format") != PACKAGE_FORMAT:
            raise UpdateError(f"{source} is not an {PACKAGE_FORMAT} manifest")
        files = {}
        for name, entry in data["files"].items():
            check_name(name)
            if name == MANIFEST:
                raise UpdateError(f"{source} lists the manifest as one of its files")
            files[name] = PackageFile(
                str(entry["format"]), str(entry["sha256"]), int(entry["size"])
            )
        if not files:
            raise UpdateError(f"{source} lists no adapter file")
        acceptance = None
        if data.get("acceptance") is not None:
            acc = data["acceptance"]
            acceptance = AcceptanceSet(
                cases=tuple(
                    AcceptanceCase(str(c["prompt"]), str(c["expected"])) for c in acc["cases"]
                ),
                min_score=float(acc.get("min_score", 1.0)),
                max_tokens=int(acc.get("max_tokens", 16)),
            )
        manifest = Manifest(
            name=check_name(data["name"]),
            version=str(data["version"]),
            base_model=str(data["base_model"]["name"]),
            base_sha256=str(data["base_model"]["sha256"]),
            files=files,
            rank=int(data["rank"]),
            targets=tuple(str(t) for t in data["targets"]),
            acceptance=acceptance,
        )
    except UpdateError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UpdateError(f"{source} is not a valid adapter manifest: {exc!r}") from None
    parse_version(manifest.version)
    return manifest


def read_package(folder: str | os.PathLike[str], *, verify: bool = True) -> Manifest:
    """The manifest of the package ``folder``; with ``verify``, each file's size and sha256
    are checked against it."""
    root = Path(folder)
    path = root / MANIFEST
    if not path.is_file():
        raise UpdateError(f"{root} is not an adapter package: it has no {MANIFEST}")
    manifest = parse_manifest(path.read_bytes(), str(path))
    if verify:
        for name, entry in manifest.files.items():
            check_file(root / name, entry)
    return manifest


def check_file(path: Path, entry: PackageFile) -> None:
    """Raise :class:`UpdateError` unless ``path`` has the size and sha256 ``entry`` records."""
    if not path.is_file():
        raise UpdateError(f"{path} is missing")
    size = path.stat().st_size
    if size != entry.size or sha256_file(path) != entry.sha256:
        raise UpdateError(f"{path} does not match its manifest's size and sha256")


def read_acceptance(
    path: str | os.PathLike[str], *, min_score: float = 1.0, max_tokens: int = 16
) -> AcceptanceSet:
    """An acceptance set from a JSONL of ``{"prompt": ..., "expected": ...}`` lines
    (``completion`` is taken for ``expected``, so training data's held-out lines serve)."""
    source = Path(path)
    if not 0.0 <= min_score <= 1.0:
        raise UpdateError(f"min_score must be between 0 and 1, not {min_score}")
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UpdateError(f"cannot read the acceptance set {source}: {exc}") from None
    cases = []
    try:
        for number, record in parse_lines(text, str(source)):
            expected = (
                record.get("expected", record.get("completion"))
                if isinstance(record, dict)
                else None
            )
            if not isinstance(expected, str) or not isinstance(record.get("prompt"), str):
                raise UpdateError(
                    f'{source}:{number}: each line must have string "prompt" and "expected" '
                    '(or "completion") fields'
                )
            cases.append(AcceptanceCase(record["prompt"], expected))
    except EdgeGemmaError as exc:
        raise UpdateError(str(exc)) from None
    if not cases:
        raise UpdateError(f"{source} holds no acceptance cases")
    return AcceptanceSet(tuple(cases), min_score, max_tokens)


def base_model_identity(model: str | os.PathLike[str]) -> tuple[str, str]:
    """(name, sha256) of the base model ``model`` (a models.lock name or a path)."""
    from .. import models

    path = models.resolve(model)
    name = str(model) if models.looks_like_a_name(str(model)) else path.name
    return name, sha256_file(path)


def pack(
    files: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    name: str,
    version: str,
    model: str | os.PathLike[str] | None = None,
    acceptance: AcceptanceSet | None = None,
) -> Manifest:
    """Write the package ``out`` (a new folder) holding the adapter ``files`` and their
    manifest; return the manifest. ``model`` is the base model they were trained for."""
    from . import DEFAULT_MODEL, format_of, inspect

    check_name(name)
    parse_version(version)
    if not files:
        raise UpdateError("a package needs at least one adapter file")
    target = Path(out)
    if target.exists():
        raise UpdateError(f"{target} exists; name a new folder for the package")
    base_name, base_sha256 = base_model_identity(model or DEFAULT_MODEL)
    entries: dict[str, PackageFile] = {}
    summaries = []
    for file in map(Path, files):
        summary = inspect(file)
        fmt = format_of(file).name
        if any(e.format == fmt for e in entries.values()):
            raise UpdateError(f"a package holds one adapter per format; {file} is a second {fmt}")
        entries[f"adapter{format_of(file).suffix}"] = PackageFile(
            fmt, sha256_file(file), file.stat().st_size
        )
        summaries.append((file, summary))
    manifest = Manifest(
        name=name,
        version=version,
        base_model=base_name,
        base_sha256=base_sha256,
        files=entries,
        rank=max(s.rank for _, s in summaries),
        targets=tuple(summaries[0][1].targets),
        acceptance=acceptance,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        building = scratch / "package"
        building.mkdir()
        for (file, _), stored in zip(summaries, entries, strict=True):
            copy_atomically(file, building / stored)
        write_atomically(building / MANIFEST, manifest.to_json())
        replace_durably(building, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return manifest


def describe_manifest(manifest: Manifest, path: Path | None = None) -> str:
    """A few aligned lines about a package, as ``edgegemma adapters inspect`` prints them."""
    from . import _size, _targets

    rows = [("package", str(path))] if path is not None else []
    rows += [
        ("name", manifest.name),
        ("version", manifest.version),
        ("base model", f"{manifest.base_model} (sha256 {manifest.base_sha256})"),
        ("rank", str(manifest.rank)),
        ("targets", _targets(manifest.targets)),
    ]
    for name, entry in manifest.files.items():
        rows.append(
            ("file", f"{name} ({entry.format}, {_size(entry.size)}, sha256 {entry.sha256})")
        )
    acc = manifest.acceptance
    rows.append(
        (
            "acceptance",
            "none"
            if acc is None
            else f"{len(acc.cases)} cases, min score {acc.min_score:g}, "
            f"{acc.max_tokens} tokens each",
        )
    )
    return "\n".join(f"{key:<13}{value}" for key, value in rows)
