"""Property tests of the public API: any call gives a result or a specific EdgeGemmaError --
never a raw exception, a hang or a non-finite number -- and the engine answers the reference
prompt the same afterwards. Broad on the scripted backend, a bounded number on llama.cpp."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import edgegemma
from edgegemma import EdgeGemmaError
from edgegemma.backends.scripted import ScriptedBackend

REFERENCE = "The capital of France is"

numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.just(1e39),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
)
prompts = st.one_of(
    st.text(max_size=60),
    st.lists(st.integers(min_value=-5, max_value=300_000), max_size=20),
    st.lists(st.integers(min_value=0, max_value=257), max_size=20).map(np.array),
    st.none(),
    st.integers(),
    st.binary(max_size=8),
    st.lists(st.one_of(st.floats(), st.text(max_size=2), st.booleans()), min_size=1, max_size=3),
)
calls = st.fixed_dictionaries(
    {},
    optional={
        "max_tokens": st.one_of(st.integers(min_value=-5, max_value=5000), st.none(), numbers),
        "temperature": numbers,
        "top_k": numbers,
        "top_p": numbers,
        "min_p": numbers,
        "repeat_penalty": numbers,
        "seed": numbers,
        "stop": st.one_of(st.lists(st.text(max_size=3), max_size=3), numbers),
        "adapters": st.one_of(
            st.none(),
            st.dictionaries(st.sampled_from(["a", "b", "nope"]), numbers, max_size=2),
            numbers,
        ),
        "on_overflow": st.sampled_from(["error", "truncate_left", "shift", "sideways", None]),
        "keep": st.one_of(st.integers(min_value=-3, max_value=80), st.text(max_size=4)),
        "timeout": numbers,
    },
)


def check_call(engine: edgegemma.Engine, prompt: object, kwargs: dict) -> None:
    try:
        result = engine.generate(prompt, **kwargs)  # type: ignore[arg-type]
    except EdgeGemmaError:
        return
    stats = result.stats
    for value in (stats.ttft_s, stats.total_s, stats.prefill_tps, stats.decode_tps):
        assert math.isfinite(value)
    assert result.finish_reason in ("stop", "length", "timeout", "cancelled")


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scripted")
    engine = edgegemma.Engine(
        ScriptedBackend(lambda prompt, adapters: f"{len(prompt)} {sorted(adapters)}", n_ctx=256),
        model_path=Path("scripted"),
    )
    for name in ("a", "b"):
        (folder / f"{name}.bin").write_bytes(b"")
        engine.load_adapter(name, folder / f"{name}.bin")
    return engine


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=prompts, kwargs=calls)
def test_any_call_on_the_scripted_backend(scripted, prompt, kwargs):
    reference = scripted.generate(REFERENCE, max_tokens=20).text
    check_call(scripted, prompt, kwargs)
    assert scripted.generate(REFERENCE, max_tokens=20).text == reference


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=prompts, kwargs=calls)
def test_any_call_on_llamacpp(engine, prompt, kwargs, tmp_path_factory):
    kwargs = (
        {**kwargs, "max_tokens": min(kwargs["max_tokens"], 8)}
        if isinstance(kwargs.get("max_tokens"), int)
        and not isinstance(kwargs.get("max_tokens"), bool)
        else kwargs
    )
    reference = engine.generate(REFERENCE, max_tokens=6).token_ids
    check_call(engine, prompt, kwargs)
    engine.reset()
    assert engine.generate(REFERENCE, max_tokens=6).token_ids == reference


operations = st.lists(
    st.sampled_from(["load", "unload", "set", "clear", "generate", "stream", "break", "reset"]),
    min_size=1,
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(plans=st.lists(operations, min_size=2, max_size=4))
def test_interleavings_across_threads_never_hang_or_leak_raw_errors(tmp_path_factory, plans):
    folder = tmp_path_factory.mktemp("threads")
    backend = ScriptedBackend(lambda prompt, adapters: "ok", token_delay_s=0.0005)
    engine = edgegemma.Engine(backend, model_path=Path("scripted"))
    for name in ("x", "y"):
        (folder / f"{name}.bin").write_bytes(b"")
    raw: list[BaseException] = []

    def worker(plan: list[str], index: int) -> None:
        name = "xy"[index % 2]
        for op in plan:
            try:
                if op == "load":
                    engine.load_adapter(name, folder / f"{name}.bin")
                elif op == "unload":
                    engine.unload_adapter(name)
                elif op == "set":
                    engine.set_adapters({name: 1.0})
                elif op == "clear":
                    engine.set_adapters(None)
                elif op == "generate":
                    engine.generate("p", max_tokens=3, adapters={name: 0.5})
                elif op == "stream":
                    for _ in engine.stream("p", max_tokens=3):
                        pass
                elif op == "break":
                    for _ in engine.stream("p", max_tokens=3):
                        break
                else:
                    engine.reset()
            except EdgeGemmaError:
                pass
            except BaseException as exc:  # noqa: BLE001 -- what this test looks for
                raw.append(exc)

    threads = [threading.Thread(target=worker, args=(p, i)) for i, p in enumerate(plans)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
        assert not t.is_alive(), "a thread hung"
    assert not raw, raw
    engine.set_adapters(None)
    assert engine.generate("p", max_tokens=3).text == "ok"
    # Every adapter that was loaded and unloaded has been freed once and only once.
    loads = [c.args["path"] for c in backend.calls if c.method == "load_adapter"]
    frees = [c.args["path"] for c in backend.calls if c.method == "free_adapter"]
    assert len(frees) <= len(loads)
    assert len(loads) - len(frees) == len(engine.adapters)
