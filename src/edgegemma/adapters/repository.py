"""The publisher's side of adapter distribution: keys and a TUF repository of packages.

A repository is static files in TUF's usual layout, served by any HTTP server, object store
or CDN::

    metadata/root.json              the trusted root a device is given (also 1.root.json, ...)
    metadata/timestamp.json         names the newest snapshot; written last by every publish
    metadata/N.snapshot.json        names the newest targets metadata
    metadata/N.targets.json         every published file's length and sha256
    targets/NAME/<sha256>.manifest.json          the newest version's manifest
    targets/NAME/VERSION/<sha256>.adapter.gguf   its adapter files

Snapshots are consistent (every file is stored under a name that holds its version or
hash), so a device reading the repository while a publish writes it sees the old state or
the new one: nothing is overwritten but ``timestamp.json`` and ``root.json``, each in one
atomic rename.

One ed25519 key signs all four roles, threshold 1: enough for one publisher. Separate keys,
an offline root key and thresholds above 1 are what docs/adapters.md describes for fleets;
the device side (:mod:`.pull`) already enforces whatever the root says.
"""

from __future__ import annotations

import os
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
)
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from ..errors import PublishError
from ..files import copy_atomically, locked, write_atomically
from .package import MANIFEST, Manifest, pack, parse_version, read_package

ROLES = (Root.type, Targets.type, Snapshot.type, Timestamp.type)
ROOT_LIFETIME = timedelta(days=365)
TARGETS_LIFETIME = timedelta(days=365)
TIMESTAMP_LIFETIME = timedelta(days=30)
"""How long a publish stays fresh. A device refuses metadata past its expiry, so a mirror
that freezes the repository is noticed within this time; the publisher must publish (or
re-sign) at least this often."""


def keygen(path: str | os.PathLike[str]) -> Path:
    """Write a new ed25519 private key to ``path`` (PEM, PKCS#8, mode 0600) and its public key
    to ``path.pub`` (PEM); return ``path``. An existing file is never overwritten."""
    target = Path(path)
    public = target.with_name(target.name + ".pub")
    for existing in (target, public):
        if existing.exists():
            raise PublishError(f"{existing} exists; keygen never overwrites a key")
    signer = CryptoSigner.generate_ed25519()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Created 0600 from the start: a private key never exists readable by others.
    handle = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(handle, "wb") as out:
        out.write(signer.private_bytes)
        out.flush()
        os.fsync(out.fileno())
    key = load_pem_private_key(signer.private_bytes, None)
    write_atomically(
        public, key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    return target


def load_signer(path: str | os.PathLike[str]) -> CryptoSigner:
    """The signer of the private key file ``path`` written by :func:`keygen`."""
    try:
        key = load_pem_private_key(Path(path).read_bytes(), None)
    except FileNotFoundError:
        raise PublishError(f"key file not found: {path}") from None
    except (ValueError, TypeError) as exc:
        raise PublishError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise PublishError(f"{path} is not an ed25519 key")
    return CryptoSigner(key)


def init_repository(repo: str | os.PathLike[str], key: str | os.PathLike[str]) -> Path:
    """Create the repository ``repo`` with ``key`` in every role; return its root.json."""
    root_dir = Path(repo)
    metadata = root_dir / "metadata"
    if (metadata / "root.json").exists():
        raise PublishError(f"{metadata / 'root.json'} exists: {root_dir} is a repository already")
    signer = load_signer(key)
    now = _now()
    root = Root(expires=now + ROOT_LIFETIME, consistent_snapshot=True)
    for role in ROLES:
        root.add_key(signer.public_key, role)
    (root_dir / "targets").mkdir(parents=True, exist_ok=True)
    targets = Targets(expires=now + TARGETS_LIFETIME)
    snapshot = Snapshot(expires=now + TARGETS_LIFETIME)
    timestamp = Timestamp(expires=now + TIMESTAMP_LIFETIME)
    with locked(root_dir / ".publish.lock"):
        _write(metadata, Metadata(root), signer, "1.root.json")
        _write(metadata, Metadata(root), signer, "root.json")
        _write(metadata, Metadata(targets), signer, "1.targets.json")
        _write(metadata, Metadata(snapshot), signer, "1.snapshot.json")
        _write(metadata, Metadata(timestamp), signer, "timestamp.json")
    return metadata / "root.json"


def publish(
    source: str | os.PathLike[str],
    repo: str | os.PathLike[str],
    key: str | os.PathLike[str],
    *,
    name: str,
    version: str,
    model: str | os.PathLike[str] | None = None,
    timestamp_lifetime: timedelta = TIMESTAMP_LIFETIME,
) -> Manifest:
    """Publish the package folder (or bare adapter file) ``source`` as ``name`` ``version``.

    A bare adapter file gets a manifest made from it and the base model ``model`` (default:
    the default model), with no acceptance set. A package keeps its manifest, renamed to
    ``name`` and ``version``. ``version`` must be newer than the one published for ``name``.
    """
    root_dir = Path(repo)
    metadata = root_dir / "metadata"
    if not (metadata / "root.json").is_file():
        raise PublishError(f"{root_dir} is not a repository (run repo-init first)")
    signer = load_signer(key)
    with tempfile.TemporaryDirectory(prefix="edgegemma-publish-") as tmp:
        package = Path(source)
        if package.is_dir():
            manifest = read_package(package)
            if (manifest.name, manifest.version) != (name, version):
                manifest = _renamed(manifest, name, version)
        else:
            package = Path(tmp) / "package"
            manifest = pack([source], package, name=name, version=version, model=model)
        parse_version(version)
        # The manifest as published, with the name and version given here.
        manifest_file = write_atomically(Path(tmp) / MANIFEST, manifest.to_json())
        with locked(root_dir / ".publish.lock"):
            _publish(root_dir, package, manifest_file, manifest, signer, timestamp_lifetime)
    return manifest


def _publish(
    root_dir: Path,
    package: Path,
    manifest_file: Path,
    manifest: Manifest,
    signer: CryptoSigner,
    timestamp_lifetime: timedelta,
) -> None:
    metadata = root_dir / "metadata"
    root = Metadata[Root].from_file(str(metadata / "root.json"))
    for role in (Targets.type, Snapshot.type, Timestamp.type):
        if signer.public_key.keyid not in root.signed.roles[role].keyids:
            raise PublishError(f"the key given is not one the repository's root names for {role}")
    timestamp = Metadata[Timestamp].from_file(str(metadata / "timestamp.json"))
    snapshot = Metadata[Snapshot].from_file(
        str(metadata / f"{timestamp.signed.snapshot_meta.version}.snapshot.json")
    )
    targets = Metadata[Targets].from_file(
        str(metadata / f"{snapshot.signed.meta['targets.json'].version}.targets.json")
    )
    pointer = f"{manifest.name}/{MANIFEST}"
    published = targets.signed.targets.get(pointer)
    if published is not None:
        before = str(published.custom.get("version", "0"))
        if parse_version(manifest.version) <= parse_version(before):
            raise PublishError(
                f"{manifest.name} {before} is published; a new version must be newer than it, "
                f"and {manifest.version} is not"
            )
    # The files first, under their hashed names: nothing a device may be reading changes.
    listed = {pointer: manifest_file}
    for file in manifest.files:
        listed[f"{manifest.name}/{manifest.version}/{file}"] = package / file
    entries = {}
    for target_path, local in listed.items():
        entry = TargetFile.from_file(target_path, str(local), ["sha256"])
        folder, _, base = target_path.rpartition("/")
        copy_atomically(local, root_dir / "targets" / folder / f"{entry.hashes['sha256']}.{base}")
        entries[target_path] = entry
    entries[pointer].unrecognized_fields["custom"] = {"version": manifest.version}
    # A device needs only the newest version of each name: older ones leave the metadata
    # (their files stay, for devices mid-download), which keeps targets.json small.
    for old in [p for p in targets.signed.targets if p.startswith(f"{manifest.name}/")]:
        del targets.signed.targets[old]
    targets.signed.targets.update(entries)
    now = _now()
    targets.signed.version += 1
    targets.signed.expires = now + TARGETS_LIFETIME
    _write(metadata, targets, signer, f"{targets.signed.version}.targets.json")
    snapshot.signed.meta["targets.json"] = MetaFile(targets.signed.version)
    snapshot.signed.version += 1
    snapshot.signed.expires = now + TARGETS_LIFETIME
    _write(metadata, snapshot, signer, f"{snapshot.signed.version}.snapshot.json")
    timestamp.signed.snapshot_meta = MetaFile(snapshot.signed.version)
    timestamp.signed.version += 1
    timestamp.signed.expires = now + timestamp_lifetime
    _write(metadata, timestamp, signer, "timestamp.json")


def _renamed(manifest: Manifest, name: str, version: str) -> Manifest:
    from dataclasses import replace

    from .package import check_name

    return replace(manifest, name=check_name(name), version=version)


def _write(folder: Path, md: Metadata, signer: CryptoSigner, filename: str) -> None:
    md.signatures.clear()
    md.sign(signer)
    write_atomically(folder / filename, md.to_bytes(JSONSerializer(compact=False)))


def _now() -> datetime:
    # TUF compares expiry in whole seconds.
    return datetime.now(UTC).replace(microsecond=0)
