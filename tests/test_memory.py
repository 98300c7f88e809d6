"""The process's memory: what edgegemma gives back to the kernel, on the real model."""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

import pytest

import edgegemma
from edgegemma.memory import release_mapped_file

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="/proc/self/smaps is Linux's"
)


def _resident_kib(path: Path) -> int:
    """This process's resident KiB of the mappings of ``path``."""
    target, total, current = str(path.resolve()), 0, None
    with open("/proc/self/smaps", encoding="utf-8") as smaps:
        for line in smaps:
            fields = line.split()
            if fields and "-" in fields[0] and not fields[0].endswith(":"):
                current = fields[5] if len(fields) >= 6 else None
            elif fields and fields[0] == "Rss:" and current == target:
                total += int(fields[1])
    return total


@linux_only
def test_released_pages_leave_the_resident_set_and_read_the_same(tmp_path):
    path = tmp_path / "data.bin"
    data = bytes(range(256)) * 4096 * 8  # 8 MiB
    path.write_bytes(data)
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        assert mapped[:] == data  # every page touched
        assert _resident_kib(path) >= 8 * 1024 - 64
        assert release_mapped_file(path) >= len(data)
        assert _resident_kib(path) < 1024
        assert mapped[:] == data  # faulted back in from the page cache, unchanged
    assert release_mapped_file(tmp_path / "not-mapped") == 0


@linux_only
def test_the_model_file_is_not_held_resident_after_loading(gguf_path):
    # Repacking reads every page of the mapped GGUF; llama.cpp keeps its own copy of what it
    # repacked, so the file's pages are given back while loading. Only the tensors used as
    # stored come back, on first use.
    with edgegemma.load(gguf_path, n_ctx=512, n_threads=2) as engine:
        size_kib = gguf_path.stat().st_size // 1024
        assert _resident_kib(gguf_path) < size_kib // 20
        engine.generate("The capital of France is", max_tokens=8)
        assert _resident_kib(gguf_path) < size_kib
