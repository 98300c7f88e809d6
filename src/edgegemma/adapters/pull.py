"""The device's side of adapter distribution: pull a package through TUF, check it, install it.

:func:`pull` runs, in this order, and installs nothing unless every step passes:

1. ``tuf.ngclient.Updater.refresh``: root, timestamp, snapshot and targets metadata, each
   checked for signatures by the threshold of keys the trusted root names, expiry, and
   versions never older than those seen before (kept in the store's ``.tuf`` folder).
2. The package's manifest and the one adapter file this backend loads, each downloaded by
   the updater (length and sha256 against the signed metadata) into a partial folder.
3. The version: newer than the installed one, and not one rolled back from.
4. The base model: the manifest's sha256 is the sha256 of the model this device runs, or of
   the model it was built from (a variant in models.lock).
5. The engine's own checks: the adapter is loaded into the base model on this backend.
6. The acceptance set, scored greedily on this backend, against its minimum.

Then the partial folder is renamed into the store and becomes current (:mod:`.store`).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, Targets
from tuf.ngclient import Updater, UpdaterConfig

from ..errors import (
    AcceptanceError,
    AdapterError,
    AdapterRejectedError,
    BadSignatureError,
    BaseModelMismatchError,
    EdgeGemmaError,
    ExpiredUpdateError,
    MixAndMatchError,
    OversizeError,
    RollbackError,
    StoreFullError,
    TamperedUpdateError,
    UntrustedUpdateError,
    UpdateError,
)
from ..files import disk_full, locked, no_space, sha256_file
from .package import (
    MANIFEST,
    MAX_MANIFEST_BYTES,
    AcceptanceSet,
    Manifest,
    check_file,
    check_name,
    parse_manifest,
    parse_version,
)
from .store import Store

if TYPE_CHECKING:
    from ..engine import Engine

DEFAULT_MAX_BYTES = 512 * 1024 * 1024
"""The largest adapter file a pull accepts unless told otherwise: LoRA files of small Gemma
models are megabytes, so anything near this is a mistake or an attack on the disk."""

# TUF names the two version faults with one exception type: metadata older than what the
# device has seen (a rollback), and metadata whose version is not the one the newer file
# naming it records (files of different publishes mixed). Its messages tell them apart.
_MIXED = re.compile(r"Expected (snapshot version \d|\w+ v\d)")


@dataclass(frozen=True)
class PullResult:
    name: str
    version: str
    """The version now current."""
    installed: bool
    """False when the newest published version was already current (or rolled back from)."""
    previous: str | None = None
    score: float | None = None
    """The acceptance set's score, when there was one."""
    note: str = ""
    path: Path | None = None
    """The current version's adapter file for this backend: what to load or serve."""


def pull(
    name: str,
    repo_url: str,
    root: str | os.PathLike[str],
    *,
    store: str | os.PathLike[str] | Store | None = None,
    model: str | os.PathLike[str] | None = None,
    backend: str = "llamacpp",
    max_bytes: int = DEFAULT_MAX_BYTES,
    n_threads: int | None = None,
) -> PullResult:
    """Pull the newest verified version of the adapter ``name`` from the TUF repository at
    ``repo_url`` (``root``: the trusted root.json a device is given) into the store.

    Raises an :class:`~edgegemma.errors.UpdateError` subclass naming the check that failed;
    the installed version then stays current and the store unchanged.
    """
    from . import DEFAULT_MODEL, format_for_backend

    check_name(name)
    shelf = store if isinstance(store, Store) else Store(store)
    fmt = format_for_backend(backend)
    with _verifying(name, repo_url, shelf):
        url = repo_url.rstrip("/")
        metadata_dir = _metadata_dir(shelf, url)
        # The name's lock keeps its versions; the repository's keeps the trusted metadata
        # that pulls of other names from the same repository update too.
        with shelf.locked(name), locked(metadata_dir.with_suffix(".lock")):
            updater = _updater(metadata_dir, url, Path(root))
            scratch = shelf.scratch(name)
            try:
                return _pull(
                    shelf, updater, name, scratch, fmt.name, backend,
                    model or DEFAULT_MODEL, max_bytes, n_threads,
                )  # fmt: skip
            finally:
                shutil.rmtree(scratch, ignore_errors=True)


def published(
    repo_url: str,
    root: str | os.PathLike[str],
    *,
    store: str | os.PathLike[str] | Store | None = None,
) -> list[str]:
    """The names of the adapters the TUF repository at ``repo_url`` publishes, from its
    targets metadata as verified now (the same checks as :func:`pull`)."""
    shelf = store if isinstance(store, Store) else Store(store)
    with _verifying("the repository", repo_url, shelf):
        url = repo_url.rstrip("/")
        metadata_dir = _metadata_dir(shelf, url)
        with locked(metadata_dir.with_suffix(".lock")):
            _updater(metadata_dir, url, Path(root)).refresh()
            # The updater keeps each metadata file it verified, under its role's name.
            targets = Metadata[Targets].from_file(str(metadata_dir / "targets.json"))
    suffix = f"/{MANIFEST}"
    return sorted(
        path.removesuffix(suffix) for path in targets.signed.targets if path.endswith(suffix)
    )


def _metadata_dir(shelf: Store, url: str) -> Path:
    return shelf.root / ".tuf" / hashlib.sha256(url.encode()).hexdigest()[:16]


@contextmanager
def _verifying(what: str, repo_url: str, shelf: Store) -> Iterator[None]:
    """TUF's and the file system's failures as the UpdateError naming the check that failed."""
    try:
        yield
    except tuf_errors.UnsignedMetadataError as exc:
        raise BadSignatureError(f"{what}: metadata not signed by the trusted keys: {exc}") from exc
    except tuf_errors.ExpiredMetadataError as exc:
        raise ExpiredUpdateError(f"{what}: the repository's metadata has expired: {exc}") from exc
    except tuf_errors.BadVersionNumberError as exc:
        if _MIXED.search(str(exc)):
            raise MixAndMatchError(f"{what}: mismatched metadata: {exc}") from exc
        raise RollbackError(f"{what}: older metadata than seen before: {exc}") from exc
    except tuf_errors.LengthOrHashMismatchError as exc:
        raise TamperedUpdateError(
            f"{what}: a download does not match its signed hash: {exc}"
        ) from exc
    except tuf_errors.DownloadLengthMismatchError as exc:
        raise OversizeError(f"{what}: a download is longer than its signed length: {exc}") from exc
    except tuf_errors.RepositoryError as exc:
        raise UntrustedUpdateError(f"{what}: the repository failed verification: {exc}") from exc
    except tuf_errors.DownloadError as exc:
        detail = str(exc) or repr(exc.__cause__ or exc)
        raise UpdateError(f"{what}: download from {repo_url} failed: {detail}") from exc
    except OSError as exc:
        full = no_space(exc, shelf.root)
        if full:
            raise StoreFullError(f"{what}: {full}") from exc
        raise UpdateError(f"{what}: {exc}") from exc


def _updater(metadata_dir: Path, url: str, root: Path) -> Updater:
    # One folder of trusted metadata per repository: what the device has seen from it is
    # what later metadata must not be older than.
    metadata_dir.mkdir(parents=True, exist_ok=True)
    # After the first pull the cached root is the trusted one (it may have been rotated
    # since); the root given is only the first trust.
    bootstrap = None if (metadata_dir / "root.json").is_file() else root.read_bytes()
    try:
        return Updater(
            str(metadata_dir),
            f"{url}/metadata/",
            None,
            f"{url}/targets/",
            config=UpdaterConfig(app_user_agent="edgegemma"),
            bootstrap=bootstrap,
        )
    except tuf_errors.RepositoryError as exc:
        where = root if bootstrap is not None else metadata_dir / "root.json"
        raise UntrustedUpdateError(f"{where} is not a trusted TUF root: {exc}") from exc


def _pull(
    store: Store,
    updater: Updater,
    name: str,
    scratch: Path,
    fmt: str,
    backend: str,
    model: str | os.PathLike[str],
    max_bytes: int,
    n_threads: int | None,
) -> PullResult:
    updater.refresh()
    pointer = updater.get_targetinfo(f"{name}/{MANIFEST}")
    if pointer is None:
        raise UpdateError(f"the repository publishes no adapter named {name!r}")
    if pointer.length > MAX_MANIFEST_BYTES:
        raise OversizeError(f"{name}'s manifest is {pointer.length} bytes long")
    updater.download_target(pointer, str(scratch / MANIFEST))
    manifest = parse_manifest((scratch / MANIFEST).read_bytes(), f"{name}'s manifest")
    if manifest.name != name:
        raise UntrustedUpdateError(f"the manifest published as {name} is {manifest.name}'s")
    state = store.state(name)
    new = parse_version(manifest.version)
    if state.current is not None:
        current = parse_version(state.current)
        if new == current or manifest.version in state.rolled_back:
            why = (
                "the newest published version"
                if new == current
                else f"the newest published, {manifest.version}, was rolled back from here"
            )
            current_package = store.installed(name)
            path = current_package.file(fmt) if current_package is not None else None
            return PullResult(name, state.current, False, state.previous, note=why, path=path)
        if new < current:
            raise RollbackError(
                f"{name}: the repository offers {manifest.version}, older than the installed "
                f"{state.current}"
            )
    file = manifest.file_for(fmt)
    entry = manifest.files[file]
    info = updater.get_targetinfo(f"{name}/{manifest.version}/{file}")
    if info is None:
        raise UntrustedUpdateError(f"{name} {manifest.version}: {file} is not in the repository")
    if info.length > max_bytes or entry.size > max_bytes:
        raise OversizeError(
            f"{name} {manifest.version}: {file} is {info.length} bytes, over this device's "
            f"limit of {max_bytes}"
        )
    if info.length != entry.size or info.hashes.get("sha256") != entry.sha256:
        raise TamperedUpdateError(
            f"{name} {manifest.version}: the manifest and the metadata differ on {file}"
        )
    if shutil.disk_usage(scratch).free < info.length:
        raise StoreFullError(f"{name}: {disk_full(scratch)}, and {file} is {info.length} bytes")
    updater.download_target(info, str(scratch / file))
    check_file(scratch / file, entry)
    # Only the file this backend loads is kept: the manifest lists the others for devices
    # on other backends.
    base_path = _check_base(manifest, model)
    score = _check_on_device(manifest, scratch / file, base_path, backend, n_threads)
    after = store.install(name, manifest.version, scratch)
    installed = store.folder(name) / "versions" / manifest.version / file
    return PullResult(name, manifest.version, True, after.previous, score, path=installed)


def accepted_base_sha256s(model: str | os.PathLike[str]) -> tuple[Path, set[str]]:
    """The path of the model ``model`` and the base sha256s an adapter may name to run on it:
    its own, and those of the models.lock entries it was built from."""
    from .. import models

    path = models.resolve(model)
    own = sha256_file(path)
    accepted = {own}
    entries = models.read_lock()
    for entry in entries.values():
        if own not in (entry.sha256, entry.sha256_aarch64):
            continue
        seen = {entry.name}
        base = entry.base
        while base is not None and base in entries and base not in seen:
            seen.add(base)
            if entries[base].sha256:
                accepted.add(str(entries[base].sha256))
            base = entries[base].base
    return path, accepted


def _check_base(manifest: Manifest, model: str | os.PathLike[str]) -> Path:
    path, accepted = accepted_base_sha256s(model)
    if manifest.base_sha256 not in accepted:
        raise BaseModelMismatchError(
            f"{manifest.name} {manifest.version} was trained for {manifest.base_model} "
            f"(sha256 {manifest.base_sha256}), not for {model} ({path.name}) nor its base"
        )
    return path


def _check_on_device(
    manifest: Manifest, file: Path, base: Path, backend: str, n_threads: int | None
) -> float | None:
    from ..engine import load

    label = f"{manifest.name} {manifest.version}"
    try:
        with load(base, backend=backend, n_ctx=1024, n_threads=n_threads) as engine:
            try:
                engine.load_adapter("candidate", file)
            except AdapterError as exc:
                raise AdapterRejectedError(f"{label}: the engine refused it: {exc}") from exc
            if manifest.acceptance is None:
                return None
            return _score(engine, manifest.acceptance, label)
    except UpdateError:
        raise
    except EdgeGemmaError as exc:
        raise AdapterRejectedError(f"{label}: checking it on {backend} failed: {exc}") from exc


def _score(engine: Engine, acceptance: AcceptanceSet, label: str) -> float:
    passed = 0
    failed = []
    for case in acceptance.cases:
        answer = engine.generate(
            case.prompt, max_tokens=acceptance.max_tokens, adapters={"candidate": 1.0}
        ).text
        if answer.strip().startswith(case.expected.strip()):
            passed += 1
        else:
            failed.append(case)
    score = passed / len(acceptance.cases) if acceptance.cases else 1.0
    if score < acceptance.min_score:
        first = failed[0]
        raise AcceptanceError(
            f"{label} scored {score:.2f} on its acceptance set, under its minimum "
            f"{acceptance.min_score:.2f} (first failure: {first.prompt!r} should start with "
            f"{first.expected!r})",
            score=score,
            min_score=acceptance.min_score,
        )
    return score


def rollback(name: str, *, store: str | os.PathLike[str] | Store | None = None) -> str:
    """Make the previous installed version of ``name`` current again; return it."""
    shelf = store if isinstance(store, Store) else Store(store)
    with shelf.locked(check_name(name)):
        after = shelf.rollback(name)
    assert after.current is not None
    return after.current
