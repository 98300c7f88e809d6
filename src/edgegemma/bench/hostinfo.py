"""Facts about the machine a report was measured on."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

LIBRARIES = (
    "edgegemma",
    "llama-cpp-python",
    "onnxruntime-genai",
    "onnxruntime",
    "litert-lm-api",
    "numpy",
    "gguf",
)
"""Distributions whose versions go into a report when installed."""


def host_info() -> dict[str, Any]:
    """CPU model, board, cores, RAM, OS, Python and library versions, edgegemma's git describe,
    and whether this Python runs under an emulator."""
    return {
        "hostname": socket.gethostname(),
        "cpu": cpu_model(),
        "board": board_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "ram_mb": ram_mb(),
        "os": os_name(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "libraries": library_versions(),
        "edgegemma_git": git_describe(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "emulated": emulation(),
    }


# Arm's own cores by "CPU part" (implementer 0x41), as /proc/cpuinfo lists them on ARM Linux,
# which has no "model name": the Pi 5 is a Cortex-A76, the Pi 4 an A72, phones mix the rest.
ARM_CORES = {
    "0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72", "0xd09": "Cortex-A73", "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76",
    "0xd0c": "Neoverse-N1", "0xd0d": "Cortex-A77", "0xd40": "Neoverse-V1", "0xd41": "Cortex-A78",
    "0xd44": "Cortex-X1", "0xd46": "Cortex-A510", "0xd47": "Cortex-A710", "0xd48": "Cortex-X2",
    "0xd49": "Neoverse-N2", "0xd4d": "Cortex-A715", "0xd4e": "Cortex-X3", "0xd4f": "Neoverse-V2",
    "0xd80": "Cortex-A520", "0xd81": "Cortex-A720", "0xd82": "Cortex-X4",
}  # fmt: skip


def _cpuinfo() -> list[dict[str, str]]:
    """/proc/cpuinfo as one dict per block (a processor, or ARM's trailing board block)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return []
    blocks: list[dict[str, str]] = [{}]
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            blocks[-1].setdefault(key.strip(), value.strip())
        elif blocks[-1]:
            blocks.append({})
    return [block for block in blocks if block]


def cpu_model() -> str:
    """``model name`` from /proc/cpuinfo (x86), the core names on ARM, else the platform's."""
    blocks = _cpuinfo()
    for block in blocks:
        for key in ("model name", "cpu model", "Processor"):
            if block.get(key):
                return block[key]
    arm = [
        ARM_CORES.get(block["CPU part"], f"ARM part {block['CPU part']}")
        for block in blocks
        if block.get("CPU implementer") == "0x41" and "CPU part" in block
    ]
    if arm:  # big.LITTLE phones list several kinds: "4x Cortex-A55 + 4x Cortex-A76"
        counts = {name: arm.count(name) for name in dict.fromkeys(arm)}
        return " + ".join(f"{n}x {name}" for name, n in counts.items())
    for block in blocks:
        if block.get("Hardware"):
            return block["Hardware"]
    return platform.processor() or platform.machine()


def board_model() -> str | None:
    """The board's name from the device tree (``Raspberry Pi 5 Model B Rev 1.0``), or the
    ``Model`` line Raspberry Pi kernels add to /proc/cpuinfo; None on PCs."""
    for path in ("/proc/device-tree/model", "/sys/firmware/devicetree/base/model"):
        try:
            return Path(path).read_bytes().rstrip(b"\0").decode(errors="replace").strip() or None
        except OSError:
            continue
    return next((block["Model"] for block in _cpuinfo() if block.get("Model")), None)


def emulation() -> str | None:
    """Why this process's timings are not the machine's own, when it runs under an emulator.

    A user-mode emulator (``qemu-aarch64``, an arm64 container on an x86 host) runs the guest's
    code on the host CPU, whose /proc/cpuinfo it passes through: an aarch64 Python that sees an
    x86 CPU there (or the reverse) is emulated.
    """
    blocks = _cpuinfo()
    if not blocks:
        return None
    machine = platform.machine().lower()
    x86_cpu = any("vendor_id" in block for block in blocks)
    arm_cpu = any("CPU implementer" in block for block in blocks)
    if machine in ("aarch64", "arm64") and x86_cpu or machine in ("x86_64", "amd64") and arm_cpu:
        host = "an x86-64" if x86_cpu else "an ARM"
        return f"{machine} code on {host} CPU ({cpu_model()}) through an emulator"
    return None


def ram_mb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    except (ValueError, OSError, AttributeError):
        return None


def os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return f"{line.partition('=')[2].strip(chr(34))} ({platform.system()} {platform.release()})"
    except OSError:
        pass
    return platform.platform()


def library_versions() -> dict[str, str]:
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def git_describe() -> str | None:
    """``git describe --always --dirty --tags`` of the checkout edgegemma runs from, if any."""
    source = Path(__file__).resolve().parents[3]
    if not (source / ".git").exists():
        return None
    try:
        done = subprocess.run(
            ["git", "-C", str(source), "describe", "--always", "--dirty", "--tags"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None
