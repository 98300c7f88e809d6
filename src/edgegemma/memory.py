"""This process's memory figures, on every platform."""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from pathlib import Path

import psutil


def peak_rss_mb() -> float:
    """The high-water mark of this process's resident memory in MiB (see :func:`peak_rss`)."""
    return peak_rss()[0]


def peak_rss() -> tuple[float, str]:
    """The high-water mark of this process's resident memory in MiB, and where it comes from.

    Linux: VmHWM; Windows: the peak working set; macOS and other POSIX systems: ru_maxrss.
    Where none is available, the current RSS (a lower bound of the peak).
    """
    info = psutil.Process().memory_info()
    peak = getattr(info, "peak_wset", None)  # Windows
    if peak is not None:
        return float(peak) / 2**20, "peak_wset"
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024, "VmHWM"
    except OSError:
        pass
    try:
        import resource  # POSIX only: imported here so that Windows never needs it
    except ImportError:
        return float(info.rss) / 2**20, "rss"
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024), "ru_maxrss"


def rss_mb() -> float:
    """This process's resident memory now, in MiB."""
    return float(psutil.Process().memory_info().rss) / 2**20


def release_mapped_file(path: str | Path) -> int:
    """Give back this process's resident pages of ``path``'s read-only mappings; return the
    bytes of mapping advised.

    The pages stay in the kernel's page cache, so touching them again is a minor fault, not
    a read from disk: for a file mapped ``PROT_READ``/``MAP_SHARED`` (llama.cpp's model
    mapping) this changes what counts as this process's RSS, never the data. Linux and
    Android only (``/proc/self/maps`` and ``madvise``); elsewhere it does nothing.
    """
    if not sys.platform.startswith("linux"):
        return 0
    target = os.path.realpath(path)
    ranges = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                # Only mappings that cannot have been written: their pages equal the file's.
                if len(fields) == 6 and fields[5].rstrip("\n") == target and "w" not in fields[1]:
                    low, high = (int(x, 16) for x in fields[0].split("-"))
                    ranges.append((low, high - low))
    except OSError:
        return 0
    advised = 0
    for start, length in ranges:
        if _libc().madvise(start, length, _MADV_DONTNEED) == 0:
            advised += length
    return advised


_MADV_DONTNEED = 4  # x86-64 and arm64 Linux


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    return libc
