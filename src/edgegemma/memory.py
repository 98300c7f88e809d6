"""This process's memory figures, on every platform."""

from __future__ import annotations

import sys

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
