"""The build cache: built once, atomic, verified, rebuilt when corrupted, one builder at a time."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from edgegemma.builds import (
    MANIFEST,
    build_path,
    cached_build,
    read_manifest,
    tree_sha256,
    verify_build,
)
from edgegemma.errors import ConversionError

KEY = {"source_sha256": "0" * 64, "tool": "1.0", "option": "a"}


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEGEMMA_HOME", str(tmp_path / "home"))


def _writer(calls: list[Path]):
    def build(out: Path) -> None:
        calls.append(out)
        (out / "model.bin").write_bytes(b"weights" * 100)
        (out / "sub").mkdir()
        (out / "sub" / "config.json").write_text('{"a": 1}')

    return build


def test_built_once_then_served_from_the_cache():
    calls: list[Path] = []
    first = cached_build("toy", KEY, _writer(calls))
    second = cached_build("toy", KEY, _writer(calls))
    assert first == second == build_path("toy", KEY)
    assert len(calls) == 1
    assert calls[0] != first  # built elsewhere, then renamed into place
    manifest = read_manifest(first)
    assert manifest["key"] == KEY and manifest["kind"] == "toy"
    assert set(manifest["files"]) == {"model.bin", "sub/config.json"}
    assert manifest["files"]["model.bin"]["size"] == 700
    assert manifest["sha256"] == tree_sha256(manifest["files"])
    assert verify_build(first)


def test_other_options_are_another_build():
    calls: list[Path] = []
    a = cached_build("toy", KEY, _writer(calls))
    b = cached_build("toy", {**KEY, "option": "b"}, _writer(calls))
    assert a != b and len(calls) == 2


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: (d / "model.bin").write_bytes(b"weightz" * 100),  # same size, other bytes
        lambda d: (d / "model.bin").write_bytes(b"short"),
        lambda d: (d / "sub" / "config.json").unlink(),
        lambda d: (d / "extra.txt").write_text("not built"),
        lambda d: (d / MANIFEST).write_text("{"),
    ],
    ids=["edited", "truncated", "deleted", "added", "manifest"],
)
def test_a_corrupted_build_is_detected_and_rebuilt(damage):
    calls: list[Path] = []
    folder = cached_build("toy", KEY, _writer(calls))
    damage(folder)
    assert not verify_build(folder)
    assert cached_build("toy", KEY, _writer(calls)) == folder
    assert len(calls) == 2
    assert verify_build(folder)
    assert (folder / "model.bin").read_bytes() == b"weights" * 100


def test_a_failed_build_leaves_nothing_that_looks_finished():
    def broken(out: Path) -> None:
        (out / "model.bin").write_bytes(b"half")
        raise RuntimeError("converter crashed")

    with pytest.raises(ConversionError, match="converter crashed"):
        cached_build("toy", KEY, broken)
    final = build_path("toy", KEY)
    assert not final.exists()
    assert [p.name for p in final.parent.iterdir()] == [final.name + ".lock"]


def test_an_interrupted_build_leaves_nothing_that_looks_finished():
    def interrupted(out: Path) -> None:
        (out / "model.bin").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_build("toy", KEY, interrupted)
    assert not build_path("toy", KEY).exists()


def test_leftovers_of_a_killed_build_are_cleaned_by_the_next_one():
    final = build_path("toy", KEY)
    final.parent.mkdir(parents=True)
    stale = final.parent / f".{final.name}.partial-killed"
    stale.mkdir()
    (stale / "model.bin").write_bytes(b"half")
    assert not verify_build(stale)
    cached_build("toy", KEY, _writer([]))
    assert not stale.exists()


def test_cheap_verification_checks_names_and_sizes_only():
    folder = cached_build("toy", KEY, _writer([]))
    (folder / "model.bin").write_bytes(b"weightz" * 100)
    assert verify_build(folder, hashes=False)
    assert not verify_build(folder)


def _slow_build(home: str, marker: str) -> None:
    os.environ["EDGEGEMMA_HOME"] = home

    def build(out: Path) -> None:
        with open(marker, "a") as f:
            f.write("built\n")
        time.sleep(1.0)
        (out / "model.bin").write_bytes(b"x")

    cached_build("toy", KEY, build)


def test_two_processes_build_the_same_thing_once(tmp_path):
    home = os.environ["EDGEGEMMA_HOME"]
    marker = tmp_path / "builds.txt"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_slow_build, args=(home, str(marker))) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    assert marker.read_text() == "built\n"
    assert verify_build(build_path("toy", KEY))


def test_keys_must_be_strings():
    with pytest.raises(TypeError):
        cached_build("toy", {"size": 3}, _writer([]))  # type: ignore[dict-item]


def test_the_manifest_is_plain_json(tmp_path):
    folder = cached_build("toy", KEY, _writer([]))
    data = json.loads((folder / MANIFEST).read_text())
    assert data["size"] == sum(entry["size"] for entry in data["files"].values())
