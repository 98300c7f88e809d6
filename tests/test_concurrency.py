"""Threads, cancellation and timeouts on every backend (the backends of tests/backend_kits.py).

The engine serializes calls: one generation runs at a time, under the adapter set its call
asked for, so a call's output never depends on what other threads are doing.
"""

from __future__ import annotations

import functools
import threading
import time
from pathlib import Path

import pytest
from backend_kits import BACKENDS, KITS, backend_model
from conftest import PROMPT

import edgegemma
from edgegemma import EngineBusyError, EngineClosedError

ADAPTER_SETS = [
    None,
    {"a": 1.0},
    {"b": 1.0},
    {"a": 0.5, "b": 0.5},
    *({"a": s} for s in (0.6, 0.8, 1.2)),
    *({"b": s} for s in (0.6, 0.8, 1.2)),
    {"a": 0.3, "b": 0.6},
    {"a": 0.6, "b": 0.3},
]
"""One call per set, all different: no call can reuse another's KV cache. (Under a LoRA,
llama.cpp's output depends on how the prompt was split into batches, so a reused prefix is
not bit-identical to a fresh one; that is the cache's business, not the threads'.)"""

pytestmark = pytest.mark.parametrize("backend", BACKENDS)


@pytest.fixture(scope="module")
def adapter_files(gguf_path: Path, tmp_path_factory):
    """``adapter_files(backend)`` -> {"a": file, "b": file}: two random adapters for it."""
    root = tmp_path_factory.mktemp("concurrency-adapters")

    @functools.cache
    def get(backend: str) -> dict[str, Path]:
        model = backend_model(backend, gguf_path)
        return {
            name: KITS[backend].adapter(model, root / f"{backend}-{name}", seed)
            for name, seed in (("a", 1), ("b", 2))
        }

    return get


@pytest.fixture
def engine(engines, adapter_files, backend):
    """The module's engine for ``backend`` with adapters a and b loaded; cleaned up after."""
    shared, _ = engines(backend)
    for name, path in adapter_files(backend).items():
        shared.load_adapter(name, path)
    yield shared
    shared.set_adapters(None)
    for name in list(shared.adapters):
        shared.unload_adapter(name)
    shared.reset()


def _run(threads: list[threading.Thread]) -> None:
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)


def test_threads_with_different_per_call_adapters_each_get_their_single_threaded_answer(engine):
    expected = [engine.generate(PROMPT, max_tokens=12, adapters=s).token_ids for s in ADAPTER_SETS]
    assert len({tuple(e) for e in expected[:4]}) == 4, "the adapters must change the answer"
    n = len(ADAPTER_SETS)
    start = threading.Barrier(n + 1)
    results: dict[int, list[int]] = {}

    def call(i: int) -> None:
        adapters = ADAPTER_SETS[i]
        start.wait()
        if i % 2:
            results[i] = engine.generate(PROMPT, max_tokens=12, adapters=adapters).token_ids
        else:
            stream = engine.stream(PROMPT, max_tokens=12, adapters=adapters)
            text = "".join(stream)
            assert text == stream.result.text
            results[i] = stream.result.token_ids

    def swap_the_engine_set() -> None:  # calls that name their adapters must not notice
        start.wait()
        for adapters in ADAPTER_SETS * 3:
            engine.set_adapters(adapters)

    _run(
        [threading.Thread(target=call, args=(i,)) for i in range(n)]
        + [threading.Thread(target=swap_the_engine_set)]
    )
    assert results == dict(enumerate(expected))


def test_close_from_another_thread_ends_a_running_generation(gguf_path, backend):
    engine = edgegemma.load(
        backend_model(backend, gguf_path), backend=backend, n_ctx=512, n_threads=2
    )
    stream = engine.stream(PROMPT, max_tokens=400)
    next(stream)
    queued: list[BaseException] = []

    def queued_call() -> None:
        try:
            engine.generate(PROMPT, max_tokens=4)
        except EngineClosedError as exc:
            queued.append(exc)

    waiter = threading.Thread(target=queued_call)
    waiter.start()
    time.sleep(0.3)  # the queued call now waits for the engine
    closer = threading.Thread(target=engine.close)
    closer.start()
    rest = list(stream)
    closer.join(timeout=30)
    waiter.join(timeout=30)
    assert not closer.is_alive() and not waiter.is_alive()
    assert stream.result.finish_reason == "cancelled"
    assert stream.result.finish_detail == "the engine was closed"
    assert stream.result.stats.completion_tokens < 400 and isinstance(rest, list)
    assert len(queued) == 1, "a call waiting for the engine gets EngineClosedError"
    with pytest.raises(EngineClosedError):
        engine.generate(PROMPT)


def _iterate_while_another_thread_closes(pieces, close) -> None:
    """Iterate ``pieces`` in this thread while another thread calls ``close()`` mid-run."""
    started = threading.Event()
    errors: list[BaseException] = []

    def closer() -> None:
        started.wait(timeout=30)
        try:
            close()
        except Exception as exc:  # noqa: BLE001 (a close that raises fails the test below)
            errors.append(exc)

    thread = threading.Thread(target=closer)
    thread.start()
    for i, _ in enumerate(pieces):
        if i == 1:
            started.set()
    started.set()
    thread.join(timeout=30)
    assert not thread.is_alive() and errors == []


def test_a_stream_closed_from_another_thread_stops_before_the_engine_runs_anything_else(engine):
    """close() from another thread while a token is being computed waits for that token,
    then cancels; the next call starts only afterwards (it used to start beside the running
    generation, and llama.cpp aborted)."""
    expected = engine.generate(PROMPT, max_tokens=12).token_ids
    for _ in range(3):
        stream = engine.stream(PROMPT, max_tokens=300)
        _iterate_while_another_thread_closes(stream, stream.close)
        assert stream.result.finish_reason == "cancelled"
        assert stream.result.stats.completion_tokens < 300
        assert engine.generate(PROMPT, max_tokens=12).token_ids == expected


def test_run_together_closed_from_another_thread_stops_before_anything_else_runs(engine):
    expected = engine.generate(PROMPT, max_tokens=12).token_ids
    streams = [engine.stream(PROMPT, max_tokens=120) for _ in range(2)]
    together = engine.run_together(streams)
    _iterate_while_another_thread_closes(together, streams[0].close)
    assert streams[0].result.finish_reason == "cancelled"
    assert streams[1].result.finish_reason == "length", "the other stream runs on"
    assert engine.generate(PROMPT, max_tokens=12).token_ids == expected
    streams = [engine.stream(PROMPT, max_tokens=120) for _ in range(2)]
    together = engine.run_together(streams)
    _iterate_while_another_thread_closes(together, together.close)
    assert streams[0].result.finish_reason == "cancelled"
    assert not streams[1].finished or streams[1].result.finish_reason == "cancelled"
    assert engine.generate(PROMPT, max_tokens=12).token_ids == expected


def test_breaking_out_of_a_stream_or_closing_it_leaves_the_engine_consistent(engine):
    base = engine.generate(PROMPT, max_tokens=12).token_ids
    with_a = engine.generate(PROMPT, max_tokens=12, adapters={"a": 1.0}).token_ids
    for i, _ in enumerate(engine.stream(PROMPT, max_tokens=12, adapters={"a": 1.0})):
        if i == 2:
            break
    assert engine.generate(PROMPT, max_tokens=12).token_ids == base
    stream = engine.stream(PROMPT, max_tokens=12)
    next(stream)
    stream.close()
    assert stream.result.finish_reason == "cancelled"
    assert engine.generate(PROMPT, max_tokens=12, adapters={"a": 1.0}).token_ids == with_a


def test_a_second_stream_in_the_same_thread_is_refused(engine):
    first = engine.stream(PROMPT, max_tokens=8)
    next(first)
    with pytest.raises(EngineBusyError):
        next(engine.stream(PROMPT, max_tokens=8))
    with pytest.raises(EngineBusyError):
        engine.set_adapters({"a": 1.0})
    first.close()
    assert first.result.finish_reason == "cancelled"
    assert engine.active_adapters == {}


def test_timeout_ends_generation_early_and_keeps_the_text(engine):
    # Both calls start from an empty cache: ONNX int4 rounds a reused prefix differently.
    engine.reset()
    result = engine.generate(PROMPT, max_tokens=500, timeout=1.0)
    assert result.finish_reason == "timeout"
    assert result.finish_detail == "timeout (1.0 s) reached"
    assert 0 < result.stats.completion_tokens < 500
    engine.reset()
    expected = engine.generate(PROMPT, max_tokens=result.stats.completion_tokens)
    assert result.token_ids == expected.token_ids
