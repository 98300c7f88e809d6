"""The ``edgegemma adapters`` commands that pack, sign, publish, pull and roll back adapter
packages. The TUF modules are imported only when one of these runs: ``tuf`` and
``securesystemslib`` come with the ``updates`` extra, and convert, inspect and validate work
without them."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import UpdateError

COMMANDS = ("pack", "keygen", "repo-init", "publish", "pull", "rollback")


def add_commands(commands: Any) -> None:
    """Add the update commands to the ``edgegemma adapters`` subparsers ``commands``."""
    from . import DEFAULT_MODEL

    pack = commands.add_parser("pack", help="write an adapter package: files plus a manifest")
    pack.add_argument("files", nargs="+", help="adapter files, at most one per format")
    pack.add_argument("--name", required=True)
    pack.add_argument("--version", required=True, help="a PEP 440 version (1, 1.2, 2.0rc1)")
    pack.add_argument("-o", "--output", required=True, help="the package folder to create")
    pack.add_argument("--model", default=DEFAULT_MODEL, help="base model (default: %(default)s)")
    pack.add_argument(
        "--acceptance",
        help='JSONL of {"prompt": ..., "expected": ...} (or "completion") lines the adapter '
        "must answer on the device before it is installed",
    )
    pack.add_argument("--min-score", type=float, default=1.0, help="share of cases to pass")
    pack.add_argument("--max-tokens", type=int, default=16, help="tokens per acceptance answer")

    keygen = commands.add_parser("keygen", help="a new ed25519 key pair: KEYFILE and KEYFILE.pub")
    keygen.add_argument("keyfile")

    init = commands.add_parser("repo-init", help="create a TUF repository of adapters")
    init.add_argument("repo_dir")
    init.add_argument("--key", required=True, help="the private key signing every role")

    publish = commands.add_parser("publish", help="sign and add a package or .gguf to a repository")
    publish.add_argument("source", help="a package folder or a bare adapter file")
    publish.add_argument("--name", required=True)
    publish.add_argument("--version", required=True)
    publish.add_argument("--repo", required=True, help="the repository folder")
    publish.add_argument("--key", required=True)
    publish.add_argument(
        "--model", default=DEFAULT_MODEL, help="a bare file's base model (default: %(default)s)"
    )

    pull = commands.add_parser(
        "pull", help="download, verify, check and install the newest version"
    )
    pull.add_argument("name")
    pull.add_argument("--repo", required=True, help="the repository's URL (http://...)")
    pull.add_argument("--root", required=True, help="the trusted root.json")
    pull.add_argument("--store", help="the adapter store (default: $EDGEGEMMA_HOME/adapters)")
    pull.add_argument("--model", default=DEFAULT_MODEL, help="this device's base model")
    pull.add_argument("--backend", default="llamacpp", help="this device's backend")
    pull.add_argument("--threads", type=int, help="threads for the on-device checks")

    back = commands.add_parser("rollback", help="make the previous installed version current")
    back.add_argument("name")
    back.add_argument("--store", help="the adapter store (default: $EDGEGEMMA_HOME/adapters)")


def run(options: argparse.Namespace) -> None:
    """Run the update command ``options.command``; errors are :class:`UpdateError`."""
    try:
        from . import package, pull, repository
    except ImportError as exc:
        raise UpdateError(
            f"{exc.name} is not installed: pip install 'edgegemma[updates]'"
        ) from None
    if options.command == "pack":
        acceptance = None
        if options.acceptance:
            acceptance = package.read_acceptance(
                options.acceptance, min_score=options.min_score, max_tokens=options.max_tokens
            )
        manifest = package.pack(
            options.files,
            options.output,
            name=options.name,
            version=options.version,
            model=options.model,
            acceptance=acceptance,
        )
        print(package.describe_manifest(manifest, options.output))
    elif options.command == "keygen":
        written = repository.keygen(options.keyfile)
        print(f"wrote {written} (private: keep it offline) and {written}.pub")
    elif options.command == "repo-init":
        root = repository.init_repository(options.repo_dir, options.key)
        print(f"wrote {root}: give this file to devices as their trusted root")
    elif options.command == "publish":
        manifest = repository.publish(
            options.source,
            options.repo,
            options.key,
            name=options.name,
            version=options.version,
            model=options.model,
        )
        print(f"published {manifest.name} {manifest.version} to {options.repo}")
    elif options.command == "pull":
        result = pull.pull(
            options.name,
            options.repo,
            options.root,
            store=options.store,
            model=options.model,
            backend=options.backend,
            n_threads=options.threads,
        )
        if result.installed:
            score = "" if result.score is None else f", acceptance score {result.score:.2f}"
            print(
                f"installed {result.name} {result.version} "
                f"(previous: {result.previous or 'none'}{score})"
            )
        else:
            print(f"{result.name} {result.version} is current ({result.note})")
        print(f"adapter file: {result.path}")
    else:
        version = pull.rollback(options.name, store=options.store)
        print(f"{options.name} {version} is current again")
