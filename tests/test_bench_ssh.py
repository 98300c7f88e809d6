"""The bench's ssh target against a real OpenSSH server started on localhost by the test."""

from __future__ import annotations

import getpass
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import arm64_python
import jsonschema
import pytest
from conftest import free_port

from edgegemma.bench import cli, schema

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """An sshd on a free localhost port that accepts a fresh key for the current user."""
    if not Path(SSHD).is_file():
        pytest.fail(
            "sshd is not installed, so the bench's ssh target cannot be tested: "
            "apt-get install openssh-server (CI's setup does this)"
        )
    if shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        pytest.fail("ssh and ssh-keygen are needed: apt-get install openssh-client")
    folder = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "user_key"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / name)], check=True
        )
    shutil.copy(folder / "user_key.pub", folder / "authorized_keys")
    port = free_port()
    user = getpass.getuser()
    (folder / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {folder / 'host_key'}\n"
        f"AuthorizedKeysFile {folder / 'authorized_keys'}\nPidFile {folder / 'sshd.pid'}\n"
        "StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        f"PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nAllowUsers {user}\nLogLevel ERROR\n"
    )
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation directory
    with open(folder / "sshd.log", "w") as log:
        server = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(folder / "sshd_config")], stdout=log, stderr=log
        )
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"sshd did not start: {(folder / 'sshd.log').read_text()}")
            time.sleep(0.1)
    options = [
        f"IdentityFile={folder / 'user_key'}",
        "StrictHostKeyChecking=no",
        "UserKnownHostsFile=/dev/null",
        "LogLevel=ERROR",
    ]
    yield f"ssh://{user}@127.0.0.1:{port}", options
    server.terminate()
    server.wait(timeout=10)


def _ssh_args(target: str, options: list[str]) -> list[str]:
    args = ["--target", target, "--remote-python", sys.executable]
    for option in options:
        args += ["--ssh-option", option]
    return args


def test_ssh_target_runs_the_harness_remotely(sshd, gguf_path, tmp_path, capsys):
    target, options = sshd
    out = tmp_path / "remote.json"
    code = cli.main([
        *_ssh_args(target, options), "--backend", "llamacpp", "--model", str(gguf_path),
        "-p", "8", "-n", "4", "-r", "2", "--task", "sensor", "--task-limit", "2", "-t", "2",
        "--n-ctx", "1024", "--json", str(out),
    ])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    found = json.loads(out.read_text())
    jsonschema.validate(found, schema.SCHEMA)
    assert found["target"] == target
    assert found["host"]["hostname"] == socket.gethostname()
    engine, raw, high_level = found["runs"]
    assert (engine["runner"], raw["runner"], high_level["runner"]) == (
        "engine",
        "raw",
        "llama-cpp-python",
    )
    assert [r["workload"] for r in engine["results"]] == [
        "pp8",
        "tg4",
        "sensor",
        "sensor (classify)",
    ]
    assert engine["peak_rss_mb"] > engine["model_size_mb"]
    # The remote's progress is relayed as it runs, and the table is printed here.
    assert "127.0.0.1|" in captured.err and "pp8" in captured.err
    assert target in captured.out and "llamacpp (runtime alone)" in captured.out


def test_unreachable_ssh_host_is_a_clear_error(sshd, capsys):
    _, options = sshd
    target = f"ssh://{getpass.getuser()}@127.0.0.1:{free_port()}"
    code = cli.main([*_ssh_args(target, options), "--task", "none", "-p", "8", "-n", "0"])
    assert code == 1
    err = capsys.readouterr().err
    assert "ssh could not connect" in err and "Connection refused" in err


def test_remote_without_edgegemma_is_a_clear_error(sshd, capsys):
    target, options = sshd
    args = _ssh_args(target, options)
    args[args.index("--remote-python") + 1] = "/nonexistent/python3"
    code = cli.main([*args, "--task", "none"])
    assert code == 1
    err = capsys.readouterr().err
    assert "the remote harness exited with 127" in err and "/nonexistent/python3" in err


def test_a_pi_shaped_arm64_target_runs_the_engine_and_reports_board_and_emulation(
    sshd, gguf_path, tmp_path, capsys
):
    """The harness over ssh on an arm64 Python (Debian bookworm's, as on Raspberry Pi OS)
    under qemu-user, with llama-cpp-python over llama.cpp cross-built for arm64 and
    llama.cpp's own llama-bench: tests/arm64_python.py says what is real and what is not."""
    sys.path.insert(0, str(Path(__file__).parent / "adb_standin"))
    try:
        from build_llama_tools import arm64_libraries, arm64_tools
    finally:
        sys.path.pop(0)
    remote_python = arm64_python.launcher(tmp_path, libraries=arm64_libraries())
    llama_bench = arm64_python.emulated_tool(arm64_tools()["llama-bench"], tmp_path)
    target, options = sshd
    args = _ssh_args(target, options)
    args[args.index("--remote-python") + 1] = str(remote_python)
    out = tmp_path / "pi.json"
    code = cli.main([
        *args, "--backend", "llamacpp", "--model", str(gguf_path), "--llama-bench", str(llama_bench),
        "-p", "0", "-n", "4", "-r", "1", "--warmup", "0", "--task", "none", "--no-baseline",
        "-t", "2", "--n-ctx", "256", "--json", str(out),
    ])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    found = json.loads(out.read_text())
    jsonschema.validate(found, schema.SCHEMA)
    host = found["host"]
    assert (host["machine"], host["python"]) == ("aarch64", "3.11.2")
    assert host["board"] == "Raspberry Pi 5 Model B Rev 1.0"
    assert host["cores"] == os.cpu_count() and host["ram_mb"] > 0 and host["cpu"]
    assert host["emulated"].startswith("aarch64 code on an x86-64 CPU")
    assert host["libraries"]["llama-cpp-python"]  # the binding, found by version on the "Pi"
    engine, reference = found["runs"]
    assert (engine["runner"], reference["runner"]) == ("engine", "llama-bench")
    for run in (engine, reference):
        assert run["error"] is None
        assert [row["workload"] for row in run["results"]] == ["tg4"]
    assert "Raspberry Pi 5 Model B Rev 1.0" in captured.out and "EMULATED" in captured.out
