"""Build llama.cpp's real ``llama-bench`` and ``llama-completion``: for this machine, and for arm64.

The bench's adb tests run them as the "on-device" binaries (and the local test runs
llama-bench as a reference). pip builds llama-cpp-python's shared libraries but no
executables. The llama-cpp-python sdist vendors llama.cpp with its tools; this compiles the
two tools and the ``common`` library they need (about 55 C++ files, ~2.5 CPU-minutes) and
links them against the ``libllama``/``libggml`` that llama-cpp-python installed, so they run
the very llama.cpp the engine runs. The result is cached under ``$EDGEGEMMA_HOME/tools/``,
keyed by the llama-cpp-python version and its libraries' contents; later calls cost a
hash of those (~25 MB).

``arm64_tools()`` cross-compiles the same two tools for Linux/Android arm64 with Debian's
``aarch64-linux-gnu`` compiler, as the Android recipe in docs/bench.md builds them (one static
binary each, ``-march=armv8.2-a+dotprod``, no OpenMP): the whole vendored llama.cpp this time,
so llama.cpp's ARM kernels and its Q4_0 repacking run, under ``qemu-aarch64 -cpu cortex-a76``
here. ``arm64_libraries()`` builds llama.cpp's shared libraries the way pip does, for the
arm64 llama-cpp-python of tests/arm64_python.py. About 10 and 4 CPU-minutes, cached the same
way, keyed by the version, the flags and the compiler's version.

The sdist comes from ``$EDGEGEMMA_LLAMA_CPP_SDIST`` (a .tar.gz) or ``pip download``.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

from filelock import FileLock

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
    with FileLock(root / ".build.lock"):
        if not folder.exists():
            _build(version, lib, folder)
    return found


ARM64_COMPILERS = ("aarch64-linux-gnu-gcc", "aarch64-linux-gnu-g++")
ARM64_CMAKE = [
    f"-DCMAKE_C_COMPILER={ARM64_COMPILERS[0]}", f"-DCMAKE_CXX_COMPILER={ARM64_COMPILERS[1]}",
    "-DCMAKE_SYSTEM_NAME=Linux", "-DCMAKE_SYSTEM_PROCESSOR=aarch64", "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=OFF", "-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod", "-DGGML_LLAMAFILE=OFF",
    "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
]  # fmt: skip
# What a phone gets: one static binary per tool, llama.cpp's own threadpool (docs/bench.md).
ARM64_TOOLS = ["-DBUILD_SHARED_LIBS=OFF", "-DCMAKE_EXE_LINKER_FLAGS=-static", "-DGGML_OPENMP=OFF"]
# What `pip install llama-cpp-python` builds on a Pi: shared libraries found next to each
# other ($ORIGIN), OpenMP on (llama.cpp's default).
ARM64_LIBRARIES = [
    "-DBUILD_SHARED_LIBS=ON", "-DGGML_OPENMP=ON", "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
    "-DCMAKE_INSTALL_RPATH=$ORIGIN",
]  # fmt: skip


def arm64_tools() -> dict[str, Path]:
    """The two tools cross-built for arm64 (static ELF), built first when needed."""
    folder = _arm64_build("tools", ARM64_TOOLS, list(TOOLS), list(TOOLS))
    return {name: folder / name for name in TOOLS}


def arm64_libraries() -> Path:
    """A folder of llama.cpp's shared libraries for arm64, as llama-cpp-python loads them."""
    return _arm64_build("lib", ARM64_LIBRARIES, ["llama"], ["lib*.so*"])


def _arm64_build(kind: str, flags: list[str], targets: list[str], outputs: list[str]) -> Path:
    """The cached cross build of ``targets`` with ``flags``: the files of ``bin/`` that match
    ``outputs``."""
    missing = [tool for tool in (*ARM64_COMPILERS, "cmake") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(
            f"{', '.join(missing)} not found: apt-get install gcc-aarch64-linux-gnu "
            "g++-aarch64-linux-gnu cmake (CI's setup does this)"
        )
    version = metadata.version("llama-cpp-python")
    compiler = subprocess.run(
        [ARM64_COMPILERS[1], "-dumpfullversion"], capture_output=True, text=True, check=True
    ).stdout.strip()
    stamp = "\n".join([version, compiler, *ARM64_CMAKE, *flags, *targets, *outputs])
    key = hashlib.sha256(stamp.encode()).hexdigest()[:12]
    root = models.home() / "tools"
    folder = root / f"llama-{kind}-{version}-aarch64-{key}"
    if folder.exists():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(root / ".build.lock"):
        if not folder.exists():
            _cross_build(version, folder, flags, targets, outputs)
    return folder


def _cross_build(
    version: str, folder: Path, flags: list[str], targets: list[str], outputs: list[str]
) -> None:
    with tempfile.TemporaryDirectory(prefix="llama-arm64-") as scratch:
        work = Path(scratch)
        with tarfile.open(_sdist(version, work)) as archive:
            archive.extractall(work / "sdist", filter="data")
        source = next((work / "sdist").glob("llama_cpp_python-*")) / "vendor/llama.cpp"
        build = work / "build"
        subprocess.run(
            ["cmake", "-S", str(source), "-B", str(build), *ARM64_CMAKE, *flags],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        subprocess.run(
            ["cmake", "--build", str(build), "--target", *targets, "-j", str(os.cpu_count() or 2)],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        for pattern in outputs:
            for built in (build / "bin").glob(pattern):
                # A library's versioned names stay links, as libllama's NEEDED entries ask.
                shutil.copy2(built, partial / built.name, follow_symlinks=False)
        os.replace(partial, folder)


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
    if sys.argv[1:] == ["--arm64"]:
        print("lib", arm64_libraries())
        built = arm64_tools()
    else:
        built = llama_tools()
    for tool, path in built.items():
        print(tool, path)
