"""The build cache: converted models and adapters are built once per (source, tools, options).

A build lives in ``<edgegemma home>/builds/<kind>/<digest>/``, where the digest hashes the
build key (source sha256, tool versions, options). It is built in a hidden temporary folder
next to it, gets a manifest (the key, plus sha256 and size of every file), and is then
renamed into place in one step. So a folder under its final name is always complete: a
failed or interrupted build leaves at most a hidden ``.partial`` folder, which the next build
of the same key removes. A per-key file lock keeps two processes from building the same
thing at once; the second waits and then finds the first one's result.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from .errors import ConversionError, EdgeGemmaError
from .files import locked, no_space, replace_durably, sha256_file
from .locations import home, read_text

MANIFEST = "edgegemma-build.json"
"""Name of the manifest file inside every finished build folder."""

_LAYOUT_VERSION = "1"
"""Bump when the manifest or folder layout changes: every build key changes with it."""

Progress = Callable[[str], None]


def builds_root() -> Path:
    return home() / "builds"


def tool_versions(*distributions: str) -> dict[str, str]:
    """Installed versions of ``distributions`` (``"missing"`` for absent ones), for build keys."""
    found = {}
    for name in distributions:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "missing"
    return found


def key_digest(kind: str, key: Mapping[str, str]) -> str:
    """The folder name of the build of ``kind`` with ``key``."""
    text = json.dumps({"kind": kind, "layout": _LAYOUT_VERSION, "key": dict(key)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def build_path(kind: str, key: Mapping[str, str]) -> Path:
    """Where the build of ``kind`` with ``key`` lives (whether or not it exists yet)."""
    return builds_root() / kind / key_digest(kind, key)


def cached_build(
    kind: str,
    key: Mapping[str, str],
    build: Callable[[Path], None],
    *,
    progress: Progress | None = None,
) -> Path:
    """The finished build folder of ``kind`` for ``key``; run ``build(folder)`` if needed.

    ``build`` fills the empty folder it is given. A cached folder whose files no longer match
    its manifest (edited, truncated, deleted) is removed and built again.
    """
    say = progress or (lambda _message: None)
    _check_key(key)
    final = build_path(kind, key)
    final.parent.mkdir(parents=True, exist_ok=True)
    if verify_build(final):
        say(f"{kind}: cached build found at {final}")
        return final
    lock = final.with_name(final.name + ".lock")
    with locked(lock, waiting=lambda: say(f"waiting for another process building {final.name}")):
        if verify_build(final):  # another process built it while we waited
            say(f"{kind}: built by another process at {final}")
            return final
        for stale in final.parent.glob(f".{final.name}.*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed build; we hold its lock
        if final.exists():
            say(f"{kind}: cached build at {final} does not match its manifest; rebuilding")
            _remove(final)
        work = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
        try:
            say(f"{kind}: building into {work}")
            started = time.monotonic()
            try:
                build(work)
            except Exception as exc:
                full = no_space(exc, work)
                if full is not None:
                    raise ConversionError(f"building {kind} failed: {full}") from exc
                if isinstance(exc, EdgeGemmaError):
                    raise
                raise ConversionError(f"building {kind} failed: {exc}") from exc
            elapsed = time.monotonic() - started
            say(f"{kind}: built in {elapsed:.0f} s; hashing the files")
            _write_manifest(work, kind, key, elapsed)
            work.chmod(
                0o755
            )  # mkdtemp made it private; a finished build is readable like any cache
            replace_durably(work, final)
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)
    say(f"{kind}: done: {final}")
    return final


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a finished build folder; :class:`ConversionError` if it has none."""
    try:
        manifest = json.loads(read_text(path / MANIFEST))
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{path} is not a finished edgegemma build: {exc}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ConversionError(f"{path / MANIFEST} is malformed")
    return manifest


def verify_build(path: Path, *, hashes: bool = True) -> bool:
    """Whether ``path`` is a finished build whose files match its manifest.

    With ``hashes=False`` only names and sizes are checked (cheap enough for every load).
    """
    try:
        files = read_manifest(path)["files"]
    except ConversionError:
        return False
    present = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    if present != set(files) | {MANIFEST}:
        return False
    for name, entry in files.items():
        file = path / name
        if file.stat().st_size != entry["size"]:
            return False
        if hashes and sha256_file(file) != entry["sha256"]:
            return False
    return True


def tree_sha256(files: Mapping[str, Mapping[str, Any]]) -> str:
    """One sha256 for a folder: over its files' sha256, size and path, in path order.

    Two builds with equal tree hashes hold byte-identical files; this is what a lock file
    records to check that a rebuild is reproducible.
    """
    lines = "".join(f"{files[n]['sha256']}  {files[n]['size']}  {n}\n" for n in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()


def _write_manifest(folder: Path, kind: str, key: Mapping[str, str], seconds: float) -> None:
    files: dict[str, dict[str, Any]] = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = file.relative_to(folder).as_posix()
        files[name] = {"sha256": sha256_file(file), "size": file.stat().st_size}
    manifest = {
        "kind": kind,
        "key": dict(key),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(seconds, 1),
        "sha256": tree_sha256(files),
        "size": sum(entry["size"] for entry in files.values()),
        "files": files,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _check_key(key: Mapping[str, str]) -> None:
    for name, value in key.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError(f"build keys map str to str, got {name!r}: {value!r}")


def _remove(path: Path) -> None:
    # Rename first so that a half-deleted folder never sits under its final name.
    doomed = path.with_name(f".{path.name}.trash-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def find_build(gguf_path: Path, kind: str, options: Mapping[str, str]) -> Path | None:
    """The newest finished build of ``kind`` from ``gguf_path`` with ``options``, or None.

    Tool versions are not compared, so a model built on another machine (or before an
    upgrade of the build tools) is found too; only the source and the options must match.
    """
    wanted = {"source_sha256": sha256_file(gguf_path), **options}
    found = []
    for folder in (builds_root() / kind).glob("[!.]*"):
        if not folder.is_dir():
            continue
        try:
            manifest = read_manifest(folder)
        except ConversionError:
            continue
        key = manifest.get("key", {})
        if all(key.get(name) == value for name, value in wanted.items()) and verify_build(
            folder, hashes=False
        ):
            found.append((manifest.get("built_at", ""), folder))
    return max(found)[1] if found else None
