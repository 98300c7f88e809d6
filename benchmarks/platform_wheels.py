"""Which pinned runtime has a wheel for which platform: the evidence behind the README's table.

For each requirement edgegemma pins (its own dependencies and every extra's), this asks the
package index (PyPI's JSON simple API, PEP 691) for the files of the pinned version and
checks their wheel tags against what pip on each platform accepts (``packaging.tags``, CPython
3.11). Where the pinned version has no wheel, it also lists the newest version that has one,
so an environment marker can choose between "that version" and "leave the backend out".

    python benchmarks/platform_wheels.py                 # the table
    python benchmarks/platform_wheels.py --json out.json # and every file behind it
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
import urllib.request
from pathlib import Path

from packaging.requirements import Requirement
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import parse_sdist_filename, parse_wheel_filename
from packaging.version import InvalidVersion, Version

INDEX = "https://pypi.org/simple"
ROOT = Path(__file__).resolve().parents[1]


def _manylinux(machine: str, glibc_minor: int) -> list[str]:
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    names = []
    for minor in range(glibc_minor, 4, -1):
        names.append(f"manylinux_2_{minor}_{machine}")
        if minor in legacy and (machine == "x86_64" or minor == 17):
            names.append(f"{legacy[minor]}_{machine}")
    return names + [f"linux_{machine}"]


def _macos(major: int) -> list[str]:
    names = []
    for version in range(major, 10, -1):
        names += [f"macosx_{version}_0_arm64", f"macosx_{version}_0_universal2"]
    return names


# Each platform as the pip on it sees wheels: CPython 3.11 and the C library it ships with.
PLATFORMS = {
    "Linux x86_64": _manylinux("x86_64", 36),  # Debian 12 / Ubuntu 22.04+: glibc >= 2.35
    "Linux aarch64 (Pi 5)": _manylinux("aarch64", 36),  # Raspberry Pi OS Bookworm: glibc 2.36
    "macOS arm64": _macos(14),
    "Windows x86_64": ["win_amd64"],
}
# What environment markers see there.
MARKERS = {
    "Linux x86_64": {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"},
    "Linux aarch64 (Pi 5)": {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "aarch64"},
    "macOS arm64": {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64"},
    "Windows x86_64": {"sys_platform": "win32", "platform_system": "Windows", "platform_machine": "AMD64"},
}  # fmt: skip


def accepted(platforms: list[str]) -> set[Tag]:
    tags = set(cpython_tags((3, 11), abis=["cp311", "abi3", "none"], platforms=platforms))
    return tags | set(compatible_tags((3, 11), platforms=platforms))


def files(name: str) -> list[str]:
    request = urllib.request.Request(
        f"{INDEX}/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    with urllib.request.urlopen(request, timeout=60) as answer:
        return [item["filename"] for item in json.load(answer)["files"] if not item.get("yanked")]


def _versions(names: list[str]) -> tuple[list[tuple[Version, frozenset[Tag]]], set[Version]]:
    """(version, tags) of every wheel and the versions of every source distribution."""
    wheels, sdists = [], set()
    for name in names:
        try:
            if name.endswith(".whl"):
                _, version, _, tags = parse_wheel_filename(name)
                wheels.append((version, tags))
            elif name.endswith((".tar.gz", ".zip")):
                sdists.add(parse_sdist_filename(name)[1])
        except (InvalidVersion, ValueError):
            continue  # names from before the standards; never the pinned versions
    return wheels, sdists


def cell(
    requirement: Requirement, names: list[str], platform_tags: set[Tag], markers: dict[str, str]
) -> dict:
    """What pip on one platform finds for one requirement."""
    if requirement.marker is not None and not requirement.marker.evaluate(
        {"python_version": "3.11", "python_full_version": "3.11.2", **markers}
    ):
        return {"status": "left out", "marker": str(requirement.marker)}
    wheels, sdists = _versions(names)
    matching = sorted({version for version, tags in wheels if tags & platform_tags}, reverse=True)
    allowed = [v for v in matching if requirement.specifier.contains(v)]
    if allowed:
        return {"status": "wheel", "version": str(allowed[0])}
    newest = str(matching[0]) if matching else None
    has_sdist = any(requirement.specifier.contains(v) for v in sdists)
    return {"status": "sdist" if has_sdist else "none", "newest_with_wheel": newest}


def pinned_requirements() -> dict[str, list[Requirement]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = {"core": [Requirement(r) for r in project["dependencies"]]}
    for extra, items in project["optional-dependencies"].items():
        groups[extra] = [Requirement(r) for r in items if not r.startswith("edgegemma")]
    return groups


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write every cell here")
    parser.add_argument(
        "--only", action="append", default=[], help="just these extras (repeatable)"
    )
    args = parser.parse_args(argv)
    tags = {name: accepted(platforms) for name, platforms in PLATFORMS.items()}
    seen: dict[str, list[str]] = {}
    table: dict[str, dict[str, dict]] = {}
    for group, requirements in pinned_requirements().items():
        if args.only and group not in args.only:
            continue
        for requirement in requirements:
            key = str(requirement.name) + str(requirement.specifier)
            if key in table:
                continue
            if requirement.name not in seen:
                seen[requirement.name] = files(requirement.name)
            table[key] = {
                platform: cell(
                    requirement, seen[requirement.name], platform_tags, MARKERS[platform]
                )
                for platform, platform_tags in tags.items()
            }
            table[key]["extras"] = [group]  # type: ignore[assignment]
    width = max(map(len, table))
    print(f"{'requirement':<{width}}  " + "  ".join(f"{p:<22}" for p in PLATFORMS))
    for key, cells in table.items():
        shown = []
        for platform in PLATFORMS:
            found = cells[platform]
            if found["status"] == "wheel":
                shown.append(f"wheel {found['version']}")
            elif found["status"] == "left out":
                shown.append("left out (marker)")
            else:
                newest = found.get("newest_with_wheel")
                shown.append(found["status"] + (f" (wheel: {newest})" if newest else ""))
        print(f"{key:<{width}}  " + "  ".join(f"{s:<22}" for s in shown))
    if args.json:
        args.json.write_text(json.dumps({"platforms": PLATFORMS, "table": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
