"""``edgegemma models``: list, fetch, verify and pin the models of the lock file."""

from __future__ import annotations

import argparse
import sys

from ..errors import EdgeGemmaError
from ..locations import home, lock_path
from .cache import expected_pin, is_cached, model_dir, read_pin, variant_build, verify
from .fetching import fetch, pin
from .lock import read_lock


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
            built = variant_build(entry, entries[str(entry.base)]) is not None
            cached = "yes" if built else "no"
            pinned = "lock" if entry.sha256 else "no"
            size = entry.size
            source = f"{entry.base}:{entry.quant}+{entry.embedding}"
        else:
            folder = model_dir(entry.name)
            record = read_pin(folder)
            expected = expected_pin(entry, record)
            target = folder / entry.artifact
            if is_cached(entry, target, record):
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
