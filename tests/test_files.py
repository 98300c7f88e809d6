"""files.py: the one way edgegemma writes, locks and hashes a file."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import pytest

from edgegemma.files import (
    copy_atomically,
    locked,
    replace_durably,
    sha256_and_stat,
    sha256_file,
    write_atomically,
    writing_atomically,
)

HOLD_ONE_SECOND = """
import sys, time
from filelock import FileLock
with FileLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(1)
"""


def test_a_write_replaces_the_file_whole_and_keeps_its_permissions(tmp_path):
    target = tmp_path / "pin.json"
    write_atomically(target, "old\n")
    target.chmod(0o600)
    write_atomically(target, b"new\n")
    assert target.read_bytes() == b"new\n"
    assert target.stat().st_mode & 0o777 == 0o600
    assert os.listdir(tmp_path) == ["pin.json"]


def test_a_failed_write_leaves_the_old_file_and_no_partial(tmp_path):
    target = tmp_path / "adapter.gguf"
    target.write_text("old")
    with pytest.raises(RuntimeError), writing_atomically(target) as partial:
        partial.write_text("half")
        raise RuntimeError("killed half way")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["adapter.gguf"]


def test_folders_are_replaced_and_copied_whole(tmp_path):
    built = tmp_path / ".work"
    (built / "sub").mkdir(parents=True)
    (built / "sub" / "model.onnx").write_bytes(b"x" * 10)
    replace_durably(built, tmp_path / "final")
    assert (tmp_path / "final" / "sub" / "model.onnx").read_bytes() == b"x" * 10
    copy = copy_atomically(tmp_path / "final", tmp_path / "copy")
    assert (copy / "sub" / "model.onnx").read_bytes() == b"x" * 10
    with pytest.raises(FileExistsError):
        copy_atomically(tmp_path / "final", copy)


def test_sha256_is_the_files_and_its_stat_the_hashed_files(tmp_path):
    data = os.urandom(3 << 20)
    path = tmp_path / "model.gguf"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    digest, info = sha256_and_stat(path)
    assert (digest, info.st_ino, info.st_size) == (sha256_file(path), path.stat().st_ino, len(data))


def test_a_lock_held_by_another_process_is_waited_for(tmp_path):
    lock = tmp_path / "model.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_ONE_SECOND, str(lock)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    waited: list[float] = []
    started = time.monotonic()
    with locked(lock, waiting=lambda: waited.append(time.monotonic())):
        assert waited and time.monotonic() - started > 0.3
    holder.wait(timeout=10)
    with locked(lock, waiting=lambda: waited.append(0.0)):
        assert len(waited) == 1  # free: no wait, no message
