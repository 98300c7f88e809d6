"""edgegemma's benchmark harness: ``python -m edgegemma.bench``.

One run measures every installed backend on the same model and workloads, each in a fresh
process, next to a raw llama.cpp decode loop (the engine's overhead) and optionally
llama.cpp's own llama-bench -- on this machine, a Linux box over ssh, or an Android device
over adb. Modules: :mod:`.cli` (the command), :mod:`.targets` and :mod:`.adb` (where it
runs), :mod:`.run` (one backend's measurements, in its own process), :mod:`.baseline` (the
raw llama.cpp loop), :mod:`.llamabench`, :mod:`.workloads`, :mod:`.stats`, :mod:`.report`.
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m edgegemma.bench``; see :func:`edgegemma.bench.cli.main`."""
    # Imported here, not at the top: `python -m edgegemma.bench.run` imports this package
    # first and must not find its own module already imported.
    from .cli import main as bench_main

    return bench_main(argv)
