"""The memory a device needs on its first command, when the default variant is built, against
every later one: the measurement behind docs/models.md's "First run".

    python benchmarks/first_run.py [--rounds 2] [--json benchmarks/results/first-run-x86-2core.json]

Each round runs ``edgegemma generate`` twice with a throwaway ``EDGEGEMMA_HOME``: first on an
empty cache (the variant is built: in a process of its own since Dec 2026), then warm. The
peak resident memory of the whole process tree is sampled every 10 ms (psutil: the command
and any build process it starts, summed), and the generation's own figure is the stats
line's. Linux and macOS.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

COMMAND = [
    "-m",
    "edgegemma",
    "generate",
    "The capital of France is",
    "--max-tokens",
    "24",
    "--stats",
]


def measure(home: Path) -> dict[str, Any]:
    """Run the command once with ``home`` as the cache; its tree's peak and its own report."""
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, *COMMAND],
        env={**os.environ, "EDGEGEMMA_HOME": str(home)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watched = psutil.Process(process.pid)
    peak = 0
    while process.poll() is None:
        try:
            tree = [watched, *watched.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree))
        except psutil.Error:
            pass  # a process of the tree ended between listing and reading it
        time.sleep(0.01)
    _, err = process.communicate()
    reported = re.search(r"peak RSS (\d+) MiB", err)
    return {
        "seconds": round(time.monotonic() - started, 1),
        "tree_peak_mib": round(peak / 2**20),
        "generation_peak_mib": int(reported.group(1)) if reported else None,
        "exit_code": process.returncode,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rounds = []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="edgegemma-first-run-") as home:
            first, later = measure(Path(home)), measure(Path(home))
        rounds.append({"first": first, "later": later})
        print(json.dumps(rounds[-1]), flush=True)
    if args.json:
        record = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB",
            "command": " ".join(["python", *COMMAND]),
            "rounds": rounds,
        }
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
