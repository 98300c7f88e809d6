"""Adapter packages published through TUF and pulled by a device: the path that works, and
the attack table -- each attack refused with its own error, the installed version in place,
the store consistent. A real HTTP server on loopback serves the repository folder (the
attacker's mirror: tests edit its files), and the real ``tuf.ngclient`` client reads it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from conftest import PROMPT, greedy
from loras import random_lora
from securesystemslib.signer import CryptoSigner
from served import start_server, stop_server
from tuf.api.metadata import Metadata, Root, Timestamp
from tuf.api.serialization.json import JSONSerializer

from edgegemma import adapters, errors, models
from edgegemma.adapters.package import (
    AcceptanceCase,
    AcceptanceSet,
    pack,
    parse_version,
    read_package,
)
from edgegemma.adapters.pull import accepted_base_sha256s, pull, rollback
from edgegemma.adapters.repository import init_repository, keygen, publish
from edgegemma.adapters.store import Store
from edgegemma.files import sha256_file

NAME = "skill"


class Mirror:
    """A folder served over HTTP on 127.0.0.1 from a thread. ``stall_after`` holds adapter
    file bodies after that many bytes until the mirror closes."""

    def __init__(self, folder: Path) -> None:
        self.stall_after: int | None = None
        self.stalled = threading.Event()
        self._closing = threading.Event()
        mirror = self

        class Handler(SimpleHTTPRequestHandler):
            def copyfile(self, source, outputfile) -> None:  # type: ignore[override]
                if mirror.stall_after is None or not self.path.endswith(".gguf"):
                    return super().copyfile(source, outputfile)
                outputfile.write(source.read(mirror.stall_after))
                outputfile.flush()
                mirror.stalled.set()
                mirror._closing.wait()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=folder))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class Setup:
    """A publisher's key and repository, its mirror, and one device's store."""

    def __init__(self, tmp: Path, lora_dir: Path, store: Path | None = None) -> None:
        self.tmp = tmp
        self.key = keygen(tmp / "keys" / "publisher")
        self.repo = tmp / "repo"
        self.root = init_repository(self.repo, self.key)
        self.store = Store(store or tmp / "store")
        self.mirror = Mirror(self.repo)
        self.lora_dir = lora_dir

    def publish(self, source: Path, version: str, **options) -> None:
        publish(source, self.repo, self.key, name=NAME, version=version, **options)

    def pull(self, **options):
        return pull(NAME, self.mirror.url, self.root, store=self.store, n_threads=2, **options)

    def installed_v1(self) -> None:
        """v1 published and installed on the device, v2 published after it."""
        self.publish(self.lora_dir / "a.gguf", "1")
        assert self.pull().version == "1"
        self.publish(self.lora_dir / "b.gguf", "2")

    def target(self, suffix: str) -> Path:
        """The newest published file in the repository whose name ends with ``suffix``."""
        found = sorted(self.repo.glob(f"targets/**/*{suffix}"), key=lambda p: p.stat().st_mtime)
        return found[-1]

    def assert_unchanged(self, version: str = "1") -> None:
        assert self.store.state(NAME).current == version
        assert self.store.problems(NAME) == []
        installed = self.store.installed(NAME)
        assert installed is not None and installed.file().is_file()


@pytest.fixture
def setup(tmp_path: Path, lora_dir: Path):
    made = Setup(tmp_path, lora_dir)
    yield made
    made.mirror.close()


def greedy_text(engine, adapter: Path, prompt: str, max_tokens: int) -> str:
    engine.load_adapter("probe", adapter)
    try:
        return engine.generate(prompt, max_tokens=max_tokens, adapters={"probe": 1.0}).text
    finally:
        engine.unload_adapter("probe")


def test_pack_publish_pull_rollback(setup: Setup, clean_engine, capsys) -> None:
    """The whole path through the CLI, with an acceptance set the adapter passes."""
    adapter = setup.lora_dir / "a.gguf"
    answer = greedy_text(clean_engine, adapter, PROMPT, 6)
    cases = setup.tmp / "acceptance.jsonl"
    cases.write_text(json.dumps({"prompt": PROMPT, "expected": answer}) + "\n")
    package = setup.tmp / "package"
    packing = ["pack", str(adapter), "--name", NAME, "--version", "1", "-o", str(package),
               "--acceptance", str(cases), "--max-tokens", "6"]  # fmt: skip
    assert adapters.main(packing) == 0
    manifest = read_package(package)
    assert manifest.acceptance is not None and manifest.acceptance.cases[0].expected == answer
    assert adapters.main(["inspect", str(package)]) == 0
    shown = capsys.readouterr().out
    assert "acceptance   1 cases" in shown and "version      1" in shown
    publishing = ["publish", str(package), "--name", NAME, "--version", "1",
                  "--repo", str(setup.repo), "--key", str(setup.key)]  # fmt: skip
    assert adapters.main(publishing) == 0
    first = setup.pull()
    assert (first.installed, first.version, first.score) == (True, "1", 1.0)
    assert setup.pull().installed is False  # nothing newer

    setup.publish(setup.lora_dir / "b.gguf", "2")  # a bare GGUF: no acceptance set
    second = setup.pull()
    assert (second.version, second.previous, second.score) == ("2", "1", None)
    installed = setup.store.installed(NAME)
    assert installed is not None
    assert installed.file().read_bytes() == (setup.lora_dir / "b.gguf").read_bytes()

    store = str(setup.store.root)
    assert adapters.main(["rollback", NAME, "--store", store]) == 0
    assert setup.store.state(NAME).current == "1"
    again = setup.pull()
    assert (again.installed, again.version) == (False, "1")  # 2 was rolled back from
    with pytest.raises(errors.UpdateError, match="no previous version"):
        rollback(NAME, store=setup.store)
    assert setup.store.problems(NAME) == []


def test_publish_refuses_an_old_version_and_a_foreign_key(setup: Setup) -> None:
    setup.publish(setup.lora_dir / "a.gguf", "2")
    with pytest.raises(errors.PublishError, match="must be newer"):
        setup.publish(setup.lora_dir / "b.gguf", "1.5")
    other = keygen(setup.tmp / "keys" / "other")
    with pytest.raises(errors.PublishError, match="not one the repository's root names"):
        publish(setup.lora_dir / "b.gguf", setup.repo, other, name=NAME, version="3")


def test_tampered_file(setup: Setup) -> None:
    setup.installed_v1()
    target = setup.target(".adapter.gguf")
    data = bytearray(target.read_bytes())
    data[-100] ^= 0xFF  # same length, one byte changed
    target.write_bytes(bytes(data))
    with pytest.raises(errors.TamperedUpdateError):
        setup.pull()
    setup.assert_unchanged()


@pytest.mark.parametrize("forgery", ["another key", "unsigned", "a root of another key"])
def test_bad_signature(setup: Setup, forgery: str) -> None:
    setup.installed_v1()
    attacker = CryptoSigner.generate_ed25519()
    metadata = setup.repo / "metadata"
    if forgery == "a root of another key":
        # A mirror offers the next root, naming and signed by the attacker's key only.
        root = Metadata[Root].from_file(str(metadata / "root.json"))
        root.signed.version += 1
        for role in root.signed.roles:
            for keyid in list(root.signed.roles[role].keyids):
                root.signed.revoke_key(keyid, role)
            root.signed.add_key(attacker.public_key, role)
        root.signatures.clear()
        root.sign(attacker)
        (metadata / "2.root.json").write_bytes(root.to_bytes(JSONSerializer()))
    else:
        path = metadata / "timestamp.json"
        timestamp = Metadata[Timestamp].from_file(str(path))
        timestamp.signed.version += 1
        timestamp.signatures.clear()
        if forgery == "another key":
            timestamp.sign(attacker)
        path.write_bytes(timestamp.to_bytes(JSONSerializer()))
    with pytest.raises(errors.BadSignatureError):
        setup.pull()
    setup.assert_unchanged()


def test_expired_metadata(setup: Setup) -> None:
    setup.publish(setup.lora_dir / "a.gguf", "1")
    assert setup.pull().version == "1"
    setup.publish(setup.lora_dir / "b.gguf", "2", timestamp_lifetime=timedelta(days=-1))
    with pytest.raises(errors.ExpiredUpdateError):
        setup.pull()
    setup.assert_unchanged()


def test_rollback_to_an_older_version(setup: Setup) -> None:
    setup.publish(setup.lora_dir / "a.gguf", "1")
    old = setup.tmp / "repo-at-1"
    shutil.copytree(setup.repo, old)
    assert setup.pull().version == "1"
    setup.publish(setup.lora_dir / "b.gguf", "2")
    assert setup.pull().version == "2"
    # The mirror serves the repository as it was at version 1, validly signed back then.
    shutil.rmtree(setup.repo)
    shutil.copytree(old, setup.repo)
    with pytest.raises(errors.RollbackError, match="older metadata"):
        setup.pull()
    setup.assert_unchanged("2")
    # A device that lost its TUF metadata still refuses a version older than the installed.
    shutil.rmtree(setup.store.root / ".tuf")
    with pytest.raises(errors.RollbackError, match="older than the installed 2"):
        setup.pull()
    setup.assert_unchanged("2")


def test_mix_and_match(setup: Setup) -> None:
    setup.installed_v1()
    metadata = setup.repo / "metadata"
    # The newest snapshot names targets v3; the mirror serves v2's targets under that name.
    shutil.copyfile(metadata / "2.targets.json", metadata / "3.targets.json")
    with pytest.raises(errors.MixAndMatchError):
        setup.pull()
    setup.assert_unchanged()


def test_base_model_mismatch(setup: Setup) -> None:
    other_base = setup.tmp / "other-base.gguf"
    other_base.write_bytes(b"GGUF another model's bytes")
    setup.publish(setup.lora_dir / "a.gguf", "1")
    assert setup.pull().version == "1"
    setup.publish(setup.lora_dir / "b.gguf", "2", model=other_base)
    with pytest.raises(errors.BaseModelMismatchError, match="other-base.gguf"):
        setup.pull()
    setup.assert_unchanged()


def test_engine_refuses_the_adapter(setup: Setup) -> None:
    setup.publish(setup.lora_dir / "a.gguf", "1")
    assert setup.pull().version == "1"
    setup.publish(setup.lora_dir / "wrong-shape.gguf", "2")
    with pytest.raises(errors.AdapterRejectedError):
        setup.pull()
    setup.assert_unchanged()


def test_failing_acceptance_set(setup: Setup) -> None:
    setup.publish(setup.lora_dir / "a.gguf", "1")
    assert setup.pull().version == "1"
    package = setup.tmp / "package-2"
    acceptance = AcceptanceSet(
        (AcceptanceCase(PROMPT, "an answer this adapter never gives"),), min_score=1.0
    )
    pack([setup.lora_dir / "b.gguf"], package, name=NAME, version="2", acceptance=acceptance)
    setup.publish(package, "2")
    with pytest.raises(errors.AcceptanceError, match="scored 0.00") as refused:
        setup.pull()
    assert refused.value.score == 0.0
    setup.assert_unchanged()


def test_over_size(setup: Setup) -> None:
    setup.installed_v1()
    with pytest.raises(errors.OversizeError, match="over this device's limit"):
        setup.pull(max_bytes=100_000)
    setup.assert_unchanged()
    # The mirror sends more bytes than the signed length (an endless-data attack).
    target = setup.target(".adapter.gguf")
    with open(target, "ab") as grown:
        grown.write(b"\0" * 100_000)
    with pytest.raises(errors.OversizeError, match="longer than its signed length"):
        setup.pull()
    setup.assert_unchanged()


@pytest.mark.parametrize("when", ["before", "while writing"])
def test_disk_full(
    tmp_path: Path, lora_dir: Path, base_header, small_disk, monkeypatch, when: str
) -> None:
    setup = Setup(tmp_path, lora_dir, store=small_disk(4))
    try:
        setup.publish(lora_dir / "a.gguf", "1")
        assert setup.pull().version == "1"
        big = random_lora(tmp_path / "big.gguf", base_header, seed=5, rank=32, std=0.01)
        assert big.stat().st_size > 4_000_000
        setup.publish(big, "2")
        if when == "while writing":  # the free-space check passes: the write hits ENOSPC
            roomy = shutil.disk_usage(tmp_path)
            monkeypatch.setattr(shutil, "disk_usage", lambda path: roomy)
        with pytest.raises(errors.StoreFullError, match="no space left") as refused:
            setup.pull()
        assert isinstance(refused.value.__cause__, OSError) == (when == "while writing")
        setup.assert_unchanged()
        assert not list(setup.store.folder(NAME).glob(".partial-*"))
    finally:
        setup.mirror.close()


def test_the_exact_commands(tmp_path: Path, lora_dir: Path, capsys) -> None:
    """keygen, repo-init, publish of a bare GGUF and pull, as a user types them."""
    key, repo, store = tmp_path / "key", tmp_path / "repo", tmp_path / "store"
    assert adapters.main(["keygen", str(key)]) == 0
    assert key.stat().st_mode & 0o777 == 0o600 and key.with_name("key.pub").is_file()
    assert adapters.main(["keygen", str(key)]) == 1  # never overwrites a key
    assert adapters.main(["repo-init", str(repo), "--key", str(key)]) == 0
    assert (repo / "metadata" / "root.json").is_file()
    publishing = ["publish", str(lora_dir / "a.gguf"), "--name", NAME, "--version", "1.0",
                  "--repo", str(repo), "--key", str(key)]  # fmt: skip
    assert adapters.main(publishing) == 0
    mirror = Mirror(repo)
    try:
        pulling = ["pull", NAME, "--repo", mirror.url + "/", "--root",
                   str(repo / "metadata" / "root.json"), "--store", str(store)]  # fmt: skip
        assert adapters.main(pulling) == 0
        assert adapters.main(pulling) == 0
    finally:
        mirror.close()
    out = capsys.readouterr().out
    assert f"installed {NAME} 1.0 (previous: none)" in out and f"{NAME} 1.0 is current" in out
    installed = store / NAME / "versions" / "1.0" / "adapter.gguf"
    assert out.count(f"adapter file: {installed}") == 2
    assert Store(store).problems(NAME) == []


def test_kill_during_download(setup: Setup) -> None:
    setup.installed_v1()
    setup.mirror.stall_after = 64 * 1024
    command = [
        sys.executable, "-m", "edgegemma", "adapters", "pull", NAME, "--repo", setup.mirror.url,
        "--root", str(setup.root), "--store", str(setup.store.root),
    ]  # fmt: skip
    puller = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert setup.mirror.stalled.wait(60), puller.stderr and puller.stderr.read()
        time.sleep(0.2)
        os.kill(puller.pid, signal.SIGKILL)
    finally:
        puller.wait()
    assert puller.returncode == -signal.SIGKILL
    setup.assert_unchanged()
    assert list(setup.store.folder(NAME).glob(".partial-*"))  # what the killed pull left
    setup.mirror.stall_after = None
    assert setup.pull().version == "2"
    assert not list(setup.store.folder(NAME).glob(".partial-*"))
    assert setup.store.problems(NAME) == []


def test_replace_adapter_keeps_calls_made_before(clean_engine, lora_dir: Path) -> None:
    """Calls made before a replace run with the old version, calls after with the new."""
    engine = clean_engine
    old, new = lora_dir / "a.gguf", lora_dir / "b.gguf"
    engine.load_adapter("skill", new)
    with_new = greedy(engine, adapters={"skill": 1.0})
    engine.unload_adapter("skill")
    engine.load_adapter("skill", old)
    with_old = greedy(engine, adapters={"skill": 1.0})
    assert with_old != with_new
    engine.set_adapters({"skill": 1.0})
    by_engine_set = engine.stream(PROMPT, max_tokens=12)
    by_call = engine.stream(PROMPT, max_tokens=12, adapters={"skill": 1.0})
    engine.replace_adapter("skill", new)
    assert engine.adapters == {"skill": new} and engine.active_adapters == {"skill": 1.0}
    for made_before in (by_engine_set, by_call):
        "".join(made_before)
        assert made_before.result.token_ids == with_old
    assert greedy(engine) == with_new
    with pytest.raises(errors.AdapterError):
        engine.replace_adapter("skill", lora_dir / "wrong-shape.gguf")
    assert engine.adapters == {"skill": new} and greedy(engine) == with_new
    with pytest.raises(errors.AdapterError, match="no adapter named 'other'"):
        engine.replace_adapter("other", old)


def test_a_variant_of_the_base_counts_as_the_base() -> None:
    """An adapter trained for the base runs on a models.lock variant built from it: the
    default model, built from the pinned file by llama.cpp's quantizer."""
    lock = models.read_lock()
    assert lock[models.DEFAULT_MODEL].base == "gemma3-270m"
    path, accepted = accepted_base_sha256s(models.DEFAULT_MODEL)
    assert accepted == {sha256_file(path), lock["gemma3-270m"].sha256}
    assert sha256_file(path) != lock["gemma3-270m"].sha256


@pytest.mark.parametrize("version", ["v 1", " 1", "1/2", "latest", ""])
def test_versions_are_pep440_and_path_safe(version: str) -> None:
    with pytest.raises(errors.UpdateError, match="PEP 440"):
        parse_version(version)


def test_serve_swaps_in_each_verified_version_and_keeps_serving_on_a_refusal(
    setup: Setup, clean_engine, tmp_path: Path
) -> None:
    """`serve --adapter-repo`: the published adapter is served from the first request, a new
    version replaces it at the next poll, a bad one is refused while the old one serves on,
    and /v1/models and /health say which version and why."""
    prompt = "The gateway reported temp=81.2C vib=0.93g and then"
    expected = {
        version: greedy_text(clean_engine, setup.lora_dir / f"{file}.gguf", prompt, 8)
        for version, file in (("1", "a"), ("2", "b"))
    }
    assert expected["1"] != expected["2"]
    setup.publish(setup.lora_dir / "a.gguf", "1")
    served = start_server(
        tmp_path, "--model", "gemma3-270m", "--n-ctx", "512", "--threads", "2",
        "--adapter-repo", setup.mirror.url,
        "--root", str(setup.root), "--store", str(setup.store.root), "--poll", "0.5",
    )  # fmt: skip
    try:

        def answer() -> str:
            reply = httpx.post(
                f"{served.url}/v1/completions",
                json={
                    "model": f"gemma3-270m:{NAME}",
                    "prompt": prompt,
                    "max_tokens": 8,
                    "temperature": 0,
                },
                timeout=60,
            )
            assert reply.status_code == 200, reply.text
            return reply.json()["choices"][0]["text"]

        def card() -> dict:
            models = httpx.get(f"{served.url}/v1/models", timeout=10).json()["data"]
            return next(m for m in models if m["id"] == f"gemma3-270m:{NAME}")

        def wait_for(check) -> None:
            deadline = time.monotonic() + 60
            while not check():
                assert time.monotonic() < deadline, served.log.read_text()
                time.sleep(0.2)

        assert answer() == expected["1"]
        assert card()["version"] == "1"
        assert card()["sha256"] == sha256_file(setup.lora_dir / "a.gguf")

        # Clients keep the server busy while v2 is published: the swap still happens, between
        # two requests, and every answer is one version's or the other's, never a mix.
        answers: list[str] = []
        busy = threading.Event()
        busy.set()

        def client() -> None:
            while busy.is_set():
                answers.append(answer())

        clients = [threading.Thread(target=client) for _ in range(3)]
        for thread in clients:
            thread.start()
        try:
            setup.publish(setup.lora_dir / "b.gguf", "2")
            wait_for(lambda: card()["version"] == "2")
        finally:
            busy.clear()
            for thread in clients:
                thread.join()
        assert answers and set(answers) <= {expected["1"], expected["2"]}
        assert answer() == expected["2"]
        assert served.health()["adapter_update"]["outcome"] == "installed"

        # A version whose file was tampered with on the mirror is refused; 2 serves on.
        setup.publish(setup.lora_dir / "a.gguf", "3")
        target = setup.target(".adapter.gguf")
        data = bytearray(target.read_bytes())
        data[-100] ^= 0xFF  # same length, one byte changed
        target.write_bytes(bytes(data))
        wait_for(lambda: (served.health()["adapter_update"] or {}).get("outcome") == "refused")
        update = served.health()["adapter_update"]
        assert update["adapter"] == NAME and "signed hash" in update["detail"]
        assert card()["version"] == "2" and answer() == expected["2"]
    finally:
        stop_server(served)
