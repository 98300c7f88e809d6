"""The thread policy: as many threads as free cores, measured from the CPU time others take."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import edgegemma
from edgegemma import threads
from edgegemma.threads import ThreadPolicy


class Clock:
    """Stands in for time and CPU counters: (wall, all processes' CPU, ours)."""

    def __init__(self) -> None:
        self.wall = self.busy = self.own = 0.0

    def advance(self, seconds: float, *, ours: float, others: float) -> None:
        self.wall += seconds
        self.own += seconds * ours
        self.busy += seconds * (ours + others)


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(threads, "usable_cores", lambda: [0, 1, 2, 3])
    monkeypatch.setattr(ThreadPolicy, "_sample", lambda self: (fake.wall, fake.busy, fake.own))
    monkeypatch.setattr(threads.time, "monotonic", lambda: fake.wall)
    return fake


@pytest.mark.parametrize(
    ("others", "expected"),
    [(0.0, 4), (0.3, 4), (0.5, 3), (1.0, 3), (1.45, 2), (2.0, 2), (3.6, 1), (8.0, 1)],
)
def test_threads_are_the_free_cores(clock, others, expected):
    policy = ThreadPolicy(4, fixed=False)
    clock.advance(0.5, ours=2.0, others=others)
    assert policy.threads() == expected


def test_the_load_is_measured_over_windows_of_at_least_0_2_s(clock):
    policy = ThreadPolicy(4, fixed=False)
    clock.advance(0.5, ours=1.0, others=2.0)
    assert policy.threads() == 2
    clock.advance(0.05, ours=1.0, others=0.0)  # too short to act on: the answer stands
    assert policy.threads() == 2
    clock.advance(0.5, ours=1.0, others=0.0)
    assert policy.threads() == 4


def test_a_fixed_count_and_the_limit_are_kept(clock):
    assert ThreadPolicy(3, fixed=True).threads() == 3
    policy = ThreadPolicy(2, fixed=False)
    clock.advance(1.0, ours=0.0, others=0.0)
    assert policy.threads() == 2  # never more than the limit


def test_an_engine_gives_up_a_core_to_a_busy_process(gguf_path):
    with edgegemma.load(gguf_path, n_ctx=512) as engine:
        limit = engine._threads.limit if engine._threads else 1
        if limit < 2:
            pytest.skip("one core: nothing to give up")
        engine.generate("warm up", max_tokens=2)
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(0.5)
            engine.generate("The capital of France is", max_tokens=24)
            assert engine._n_threads < limit
        finally:
            hog.kill()
            hog.wait()
        time.sleep(0.5)
        engine.generate("The capital of France is", max_tokens=24)
        assert engine._n_threads == limit


def test_import_sets_no_openmp_policy():
    code = "import os, edgegemma; print(os.environ.get('OMP_WAIT_POLICY'))"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "None"
