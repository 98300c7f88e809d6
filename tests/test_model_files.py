"""Hostile model files for the llama.cpp backend: every one is refused with a ModelError."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

import edgegemma
from edgegemma import ModelError, UnsupportedArchitectureError
from edgegemma.gguffile import read_header


def _header_only(path: Path, n_tensors: int, n_kv: int, body: bytes = b"") -> Path:
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + body)
    return path


def _gguf_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def test_absurd_tensor_count(tmp_path):
    with pytest.raises(ModelError, match="claims"):
        edgegemma.load(_header_only(tmp_path / "count.gguf", 2**60, 0, b"\0" * 64))


def test_absurd_metadata_count(tmp_path):
    with pytest.raises(ModelError, match="claims"):
        edgegemma.load(_header_only(tmp_path / "kv.gguf", 1, 2**62, b"\0" * 64))


def test_absurd_string_length(tmp_path):
    body = struct.pack("<Q", 2**50) + b"general.architecture"
    with pytest.raises(ModelError, match="more bytes"):
        edgegemma.load(_header_only(tmp_path / "string.gguf", 0, 1, body))


def test_absurd_tensor_size(tmp_path):
    info = _gguf_string("token_embd.weight") + struct.pack("<IQQIQ", 2, 2**31, 2**31, 0, 0)
    with pytest.raises(ModelError, match="truncated or corrupt|impossible shape"):
        edgegemma.load(_header_only(tmp_path / "size.gguf", 1, 0, info + b"\0" * 64))


def test_unsupported_version(tmp_path):
    path = tmp_path / "v9.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 9, 0, 0) + b"\0" * 16)
    with pytest.raises(ModelError, match="unsupported GGUF version 9"):
        edgegemma.load(path)


def test_an_unknown_architecture_is_refused_before_llama_cpp_reads_it(gguf_path, tmp_path):
    data = bytearray(gguf_path.read_bytes())
    key = _gguf_string("general.architecture") + struct.pack("<I", 8) + _gguf_string("gemma3")
    at = data.find(key)
    assert at > 0
    data[at + len(key) - 6 : at + len(key)] = b"gemmaX"
    bad = tmp_path / "arch.gguf"
    bad.write_bytes(bytes(data))
    assert read_header(bad).architecture == "gemmaX"
    with pytest.raises(
        UnsupportedArchitectureError, match="arch.gguf: 'gemmaX' is not a Gemma architecture"
    ):
        edgegemma.load(bad)


def test_random_bytes_with_gguf_magic_never_crash(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(50):
        path = tmp_path / f"fuzz{i}.gguf"
        path.write_bytes(b"GGUF" + struct.pack("<I", 3) + rng.bytes(int(rng.integers(16, 4096))))
        with pytest.raises(ModelError):
            edgegemma.load(path)
