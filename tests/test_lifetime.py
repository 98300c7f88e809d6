"""Adapter lifetime across queued and streaming calls, and streams moving between threads.

The semantics (docs/design/reliability.md): a call keeps the adapters it was made with alive until it
ends. ``unload_adapter`` removes the name at once -- later calls cannot use it, and a new
adapter may take the name -- but the adapter's memory is freed only when the last call made
with it has finished or been closed. A stream belongs to itself, not to the thread that made
it: any thread may iterate it; a thread that calls the engine from inside the loop of a stream
it is iterating gets ``EngineBusyError`` instead of waiting for itself.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import edgegemma
from edgegemma import AdapterError, EngineBusyError
from edgegemma.backends.scripted import ScriptedBackend


def reply(prompt: str, adapters: dict[str, float]) -> str:
    """Answers name the adapter files they were made with: a test sees which one ran."""
    return "+".join(f"{name}@{scale:g}" for name, scale in sorted(adapters.items())) or "base"


@pytest.fixture
def scripted(tmp_path):
    backend = ScriptedBackend(reply)
    engine = edgegemma.Engine(backend, model_path=Path("scripted"))
    files = {}
    for name in ("emoji", "other", "third"):
        files[name] = tmp_path / f"{name}.bin"
        files[name].write_bytes(b"")
    return engine, backend, files


def freed(backend: ScriptedBackend) -> list[str]:
    return [c.args["path"].name for c in backend.calls if c.method == "free_adapter"]


def test_a_stream_keeps_its_adapter_through_an_unload(scripted):
    engine, backend, files = scripted
    engine.load_adapter("emoji", files["emoji"])
    stream = engine.stream("p", max_tokens=40, adapters={"emoji": 1.0})
    engine.unload_adapter("emoji")
    assert "emoji" not in engine.adapters and freed(backend) == []
    with pytest.raises(AdapterError, match="no adapter named 'emoji'"):
        engine.generate("p", adapters={"emoji": 1.0})
    text = "".join(stream)
    assert text == "emoji.bin@1" and stream.result.adapters == {"emoji": 1.0}
    assert freed(backend) == ["emoji.bin"]  # freed once its last call ended


def test_a_rebound_name_does_not_change_a_pending_stream(scripted):
    engine, _backend, files = scripted
    engine.load_adapter("emoji", files["emoji"])
    stream = engine.stream("p", max_tokens=40, adapters={"emoji": 1.0})
    engine.unload_adapter("emoji")
    engine.load_adapter("emoji", files["other"])
    assert "".join(stream) == "emoji.bin@1"
    assert engine.generate("p", max_tokens=40, adapters={"emoji": 1.0}).text == "other.bin@1"


def test_a_closed_or_dropped_stream_releases_its_adapters(scripted):
    engine, backend, files = scripted
    engine.load_adapter("emoji", files["emoji"])
    engine.load_adapter("other", files["other"])
    closed = engine.stream("p", max_tokens=8, adapters={"emoji": 1.0})
    dropped = engine.stream("p", max_tokens=8, adapters={"other": 1.0})
    engine.unload_adapter("emoji")
    engine.unload_adapter("other")
    closed.close()
    del dropped
    assert sorted(freed(backend)) == ["emoji.bin", "other.bin"]


def test_an_engine_set_made_at_call_time_survives_unload(scripted):
    engine, _backend, files = scripted
    engine.load_adapter("emoji", files["emoji"])
    engine.set_adapters({"emoji": 0.5})
    stream = engine.stream("p", max_tokens=40)
    engine.set_adapters(None)
    engine.unload_adapter("emoji")
    assert "".join(stream) == "emoji.bin@0.5"


@pytest.mark.parametrize("trial", range(12))
def test_generate_and_unload_racing_on_a_busy_engine(scripted, trial):
    engine, backend, files = scripted
    engine.load_adapter("emoji", files["emoji"])
    busy = engine.stream("p", max_tokens=40)
    next(busy)  # holds the engine
    outcome: dict[str, object] = {}
    barrier = threading.Barrier(2)

    def call() -> None:
        barrier.wait()
        try:
            outcome["text"] = engine.generate("p", max_tokens=40, adapters={"emoji": 1.0}).text
        except AdapterError as exc:  # the unload won the race: the name was gone
            outcome["text"] = exc

    def unload() -> None:
        barrier.wait()
        engine.unload_adapter("emoji")

    threads = [threading.Thread(target=call), threading.Thread(target=unload)]
    for t in threads:
        t.start()
    busy.close()
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    text = outcome["text"]
    assert text == "emoji.bin@1" or (isinstance(text, AdapterError) and "no adapter" in str(text))
    assert freed(backend) == ["emoji.bin"]


def test_a_stream_iterated_in_another_thread_whose_loop_calls_the_engine(scripted):
    engine, _, _ = scripted
    stream = engine.stream("p", max_tokens=3)
    result: dict[str, object] = {}

    def consume() -> None:
        try:
            for _piece in stream:
                engine.generate("q", max_tokens=1)
        except EngineBusyError as exc:
            result["error"] = exc

    worker = threading.Thread(target=consume)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "deadlock: the loop body waited for its own stream"
    assert isinstance(result.get("error"), EngineBusyError)
    stream.close()
    assert engine.generate("q", max_tokens=4).text == "base"


def test_a_stream_handed_from_thread_to_thread(scripted):
    engine, _, _ = scripted
    stream = engine.stream("p", max_tokens=10)
    pieces = [next(stream)]

    def more() -> None:
        pieces.extend(stream)

    worker = threading.Thread(target=more)
    worker.start()
    worker.join(10)
    assert "".join(pieces) == "base" and stream.result.finish_reason == "stop"
    assert engine.generate("q", max_tokens=4).text == "base"  # the creating thread is free


def test_close_from_another_thread_while_a_stream_is_paused(scripted):
    engine, backend, _ = scripted
    stream = engine.stream("p", max_tokens=4)
    next(stream)  # paused between pieces, holding the engine
    closer = threading.Thread(target=engine.close)
    closer.start()
    closer.join(10)
    assert not closer.is_alive(), "close() waited forever for a paused stream"
    assert list(stream) == [] or stream.result.finish_reason == "cancelled"
    assert backend.closed


def test_a_call_keeps_the_engine_set_of_its_moment_against_a_concurrent_set(scripted):
    engine, _, files = scripted
    engine.load_adapter("emoji", files["emoji"])
    engine.load_adapter("other", files["other"])
    engine.set_adapters({"emoji": 1.0})
    busy = engine.stream("p", max_tokens=40)
    next(busy)  # the engine is busy: the next call waits
    made = threading.Event()
    result: dict[str, str] = {}

    def call() -> None:
        stream = engine.stream("p", max_tokens=40)  # made now, under {"emoji": 1.0}
        made.set()
        result["text"] = "".join(stream)

    worker = threading.Thread(target=call)
    worker.start()
    made.wait(10)
    engine_set = threading.Thread(target=engine.set_adapters, args=({"other": 1.0},))
    engine_set.start()
    busy.close()
    for thread in (worker, engine_set):
        thread.join(10)
        assert not thread.is_alive()
    assert result["text"] == "emoji.bin@1"
    assert engine.generate("p", max_tokens=40).text == "other.bin@1"
