"""The process's memory: what edgegemma gives back to the kernel, on the real model."""

from __future__ import annotations

import mmap
import subprocess
import sys
from pathlib import Path

import pytest

import edgegemma
from edgegemma.memory import release_mapped_file
from edgegemma.partial_import import import_submodule

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


_IMPORTS = """
import sys
import edgegemma
with edgegemma.load(sys.argv[1], n_ctx=512, n_threads=2) as engine:
    engine.generate("The capital of France is", max_tokens=4)
    heavy = ["llama_cpp.llama", "llama_cpp.llama_chat_format", "gguf.gguf_reader", "jinja2",
             "llguidance"]
    print("loaded:", [name for name in heavy if name in sys.modules])
    engine.generate("Paris", max_tokens=2, choices=["yes", "no"])
    engine.chat([{"role": "user", "content": "Hi"}], max_tokens=2)
    print("then:", sorted(name for name in ("jinja2", "llguidance") if name in sys.modules))
from llama_cpp import Llama
import gguf
import llama_cpp
print("whole packages:", Llama.__name__, gguf.GGUFReader.__name__, bool(llama_cpp.__version__))
"""


def test_generating_imports_only_what_it_uses(gguf_path):
    # Each skipped import is resident memory on a Pi (docs/models.md); code in the same
    # process that wants all of llama_cpp or gguf still gets it.
    done = subprocess.run(
        [sys.executable, "-c", _IMPORTS, str(gguf_path)],
        check=False,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "loaded: []",
        "then: ['jinja2', 'llguidance']",
        "whole packages: Llama GGUFReader True",
    ]


def test_a_package_imported_before_is_used_as_it_is():
    program = (
        "import sys, llama_cpp, edgegemma.backends.llamacpp as backend\n"
        "print(backend.ll is llama_cpp.llama_cpp, 'llama_cpp.llama' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], check=False, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True"]


def test_import_submodule_refuses_what_is_not_a_package():
    with pytest.raises(ImportError, match="'tabnanny' is not a package"):
        import_submodule("tabnanny.module")
    with pytest.raises(ImportError, match="no package named 'no_such_package'"):
        import_submodule("no_such_package.module")
