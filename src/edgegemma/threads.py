"""How many threads a generation runs on: the cores this process may use, less the busy ones.

llama.cpp's worker threads wait for each other at every step of a token. On an idle device
they should spin while they wait (sleeping and waking costs about half of decode speed); on
a device where another process keeps a core busy, a spinning thread that the scheduler has
parked behind that process stalls all the others, so one thread fewer is faster
(docs/performance.md has the figures). Neither a fixed wait policy nor a fixed thread count is
right for both, so the count follows the cores that are actually free: before each generation,
and every ``_INTERVAL_S`` while one runs, the CPU time other processes took on this
process's cores since the last look decides how many threads the next tokens get.
``docs/design/threads.md`` has the measurements behind each choice.
"""

from __future__ import annotations

import math
import os
import time

import psutil

_INTERVAL_S = 0.2
"""Shortest window over which the load is measured; shorter ones are too noisy to act on."""
_BUSY_CORE = 0.4
"""A core that other processes keep busy at least this much (beyond whole cores) is given up."""
MAX_DEFAULT_THREADS = 8
"""More threads than this rarely helps a small model, and each one costs memory bandwidth."""


def usable_cores() -> list[int]:
    """The CPUs this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity API in os
        try:
            cores = psutil.Process().cpu_affinity()
        except (AttributeError, psutil.Error):
            cores = None
        return sorted(cores) if cores else list(range(psutil.cpu_count() or 1))


def default_threads() -> int:
    """Cores this process may run on, capped at :data:`MAX_DEFAULT_THREADS`."""
    return max(1, min(len(usable_cores()), MAX_DEFAULT_THREADS))


class ThreadPolicy:
    """The thread count for the next tokens: fixed, or adapted to the free cores.

    ``fixed=True`` always answers ``limit`` (the user passed ``n_threads``). Otherwise the
    answer is ``limit`` minus the cores other processes keep busy, at least 1.
    """

    def __init__(self, limit: int, *, fixed: bool):
        self.limit = limit
        self.fixed = fixed
        self._cores = usable_cores()
        self._process = psutil.Process()
        self._current = limit
        self._last = self._sample()

    def threads(self) -> int:
        """The thread count to use now (cheap: the load is re-measured at most every 0.2 s)."""
        if self.fixed:
            return self.limit
        now = time.monotonic()
        if now - self._last[0] < _INTERVAL_S:
            return self._current
        sample = self._sample()
        wall = sample[0] - self._last[0]
        others = max(0.0, (sample[1] - self._last[1]) - (sample[2] - self._last[2])) / wall
        self._last = sample
        busy = max(0, math.ceil(others - _BUSY_CORE))
        self._current = max(1, min(self.limit, len(self._cores) - busy))
        return self._current

    def _sample(self) -> tuple[float, float, float]:
        """(monotonic time, CPU seconds all processes used on our cores, CPU seconds we used)."""
        now = time.monotonic()
        per_cpu = psutil.cpu_times(percpu=True)
        busy = 0.0
        for index in self._cores:
            if index < len(per_cpu):
                t = per_cpu[index]
                busy += sum(t) - t.idle - getattr(t, "iowait", 0.0)
                # guest time is already counted in user time on Linux
                busy -= getattr(t, "guest", 0.0) + getattr(t, "guest_nice", 0.0)
        own = self._process.cpu_times()
        return now, busy, own.user + own.system
