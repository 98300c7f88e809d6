"""Build llama.cpp's real ``llama-bench`` and ``llama-completion`` for this machine.

The bench's adb tests run them as the "on-device" binaries (and the local test runs
llama-bench as a reference). pip builds llama-cpp-python's shared libraries but no
executables. The llama-cpp-python sdist vendors llama.cpp with its tools; this compiles the
two tools and the ``common`` library they need (about 55 C++ files, ~2.5 CPU-minutes) and
links them against the ``libllama``/``libggml`` that llama-cpp-python installed, so they run
the very llama.cpp the engine runs. The result is cached under ``$EDGEGEMMA_HOME/tools/``,
keyed by the llama-cpp-python version and its libraries' contents; later calls cost a
hash of those (~25 MB).

The sdist comes from ``$EDGEGEMMA_LLAMA_CPP_SDIST`` (a .tar.gz) or ``pip download``.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

from edgegemma import models

TOOLS = {"llama-bench": "tools/llama-bench", "llama-completion": "tools/completion"}
_PARTS = (
    "common/", "include/", "ggml/include/", "vendor/nlohmann/", "vendor/sheredom/",
    "vendor/cpp-httplib/", "src/llama-ext.h", *(f"{folder}/" for folder in TOOLS.values()),
)  # fmt: skip
_FLAGS = ["-std=c++17", "-O1", "-g0", "-DNDEBUG", "-fPIC", "-pthread"]


def _libraries() -> Path:
    import llama_cpp

    return Path(llama_cpp.__file__).parent / "lib"


def _key(version: str, lib: Path) -> str:
    stamp = [version, *_FLAGS, *TOOLS]
    for name in sorted(os.listdir(lib)):
        # By content: every fresh venv installs the same libraries with new mtimes.
        stamp.append(f"{name}:{hashlib.sha256((lib / name).read_bytes()).hexdigest()}")
    return hashlib.sha256("\n".join(stamp).encode()).hexdigest()[:12]


def llama_tools() -> dict[str, Path]:
    """The cached binaries by name, built first when needed."""
    version = metadata.version("llama-cpp-python")
    lib = _libraries()
    root = models.home() / "tools"
    folder = root / f"llama-tools-{version}-{_key(version, lib)}"
    found = {name: folder / name for name in TOOLS}
    if all(path.exists() for path in found.values()):
        return found
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not folder.exists():
            _build(version, lib, folder)
    return found


def _sdist(version: str, work: Path) -> Path:
    configured = os.environ.get("EDGEGEMMA_LLAMA_CPP_SDIST")
    if configured:
        return Path(configured)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
         f"llama-cpp-python=={version}", "-d", str(work)],
        check=True,
    )  # fmt: skip
    return next(work.glob("llama_cpp_python-*.tar.gz"))


def _build(version: str, lib: Path, folder: Path) -> None:
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler}) to build llama.cpp's tools with")
    with tempfile.TemporaryDirectory(prefix="llama-tools-build-") as scratch:
        work = Path(scratch)
        src = _extract(_sdist(version, work), work / "src")
        build_info = work / "build-info.cpp"
        build_info.write_text(
            (src / "common/build-info.cpp.in").read_text()
            .replace("@LLAMA_BUILD_NUMBER@", "0")
            .replace("@LLAMA_BUILD_COMMIT@", f"llama-cpp-python-{version}")
            .replace("@BUILD_COMPILER@", compiler)
            .replace("@BUILD_TARGET@", os.uname().machine)
        )  # fmt: skip
        shared = [
            *sorted(p for p in (src / "common").rglob("*.cpp") if p.name != "llguidance.cpp"),
            src / "vendor/cpp-httplib/httplib.cpp",
            build_info,
        ]
        own = {name: sorted((src / tool).glob("*.cpp")) for name, tool in TOOLS.items()}
        includes = [f"-I{src / d}" for d in ("common", "include", "ggml/include", "vendor")]

        def compile_one(item: tuple[int, Path]) -> Path:
            index, source = item
            obj = work / f"{index:03d}-{source.stem}.o"
            # A tool's own folder only: common/jinja has a string.h that would shadow libc's.
            extra = [f"-I{source.parent}"] if source.parent.parent.name == "tools" else []
            subprocess.run(
                [compiler, *_FLAGS, *includes, *extra, "-c", str(source), "-o", str(obj)],
                check=True,
            )
            return obj

        sources = shared + [s for files in own.values() for s in files]
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            objects = dict(zip(sources, pool.map(compile_one, enumerate(sources))))
        out = work / "out"
        out.mkdir()
        for name, files in own.items():
            subprocess.run(
                [compiler, "-pthread", "-o", str(out / name), *(str(objects[s]) for s in shared + files),
                 f"-L{lib}", "-lllama", "-lggml", "-lggml-base", f"-Wl,-rpath,{lib}"],
                check=True,
            )  # fmt: skip
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(out, partial)
        os.replace(partial, folder)


def _extract(sdist: Path, out: Path) -> Path:
    """The vendored llama.cpp parts the tools need, extracted from the sdist."""
    with tarfile.open(sdist) as archive:
        members = []
        for member in archive.getmembers():
            _, _, inner = member.name.partition("/vendor/llama.cpp/")
            if inner and inner.startswith(_PARTS) and (member.isfile() or member.isdir()):
                member.name = inner
                members.append(member)
        archive.extractall(out, members=members, filter="data")
    return out


if __name__ == "__main__":
    for tool, path in llama_tools().items():
        print(tool, path)
