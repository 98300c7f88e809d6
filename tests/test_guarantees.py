"""Documented guarantees that only a broken implementation could fail, tested where they can fail.

- The KV cache is keyed by the adapter set: under ``prefix_cache="always"`` (where reuse with
  adapters is allowed at all) a prefix is reused only under the very same adapters and scales.
- ``shift`` keeps the protected prefix and closes the gap in the positions.
- The CLI's ``--adapter NAME=PATH:SCALE``, ``--stream`` and ``--stop`` do what they say.
- LiteRT-LM's engine, recreated every 16 LoRA sessions, keeps giving the same answers.
"""

from __future__ import annotations

import subprocess
import sys

import llama_cpp as ll
import pytest
from conftest import PROMPT

import edgegemma

PREFIX = "Reading: temp=81.2C vib=0.93g batt=3.71V hum=40% rpm=3100 fan=on\nStatus:"


@pytest.fixture(scope="module")
def always(gguf_path, lora_dir):
    with edgegemma.load(gguf_path, n_ctx=512, n_threads=2, prefix_cache="always") as engine:
        engine.load_adapter("a", lora_dir / "a.gguf")
        engine.load_adapter("b", lora_dir / "b.gguf")
        yield engine


def cached(engine: edgegemma.Engine, adapters: dict[str, float] | None) -> int:
    return engine.generate(PREFIX + " x", max_tokens=1, adapters=adapters).stats.cached_tokens


def test_the_cache_is_reused_under_the_same_set_only(always, lora_dir):
    always.reset()
    always.generate(PREFIX, max_tokens=1, adapters={"a": 1.0})
    assert cached(always, {"a": 1.0}) > 10  # same adapter, same scale: the prefix is reused
    assert cached(always, {"b": 1.0}) == 0  # adapter -> adapter
    assert cached(always, {"b": 0.5}) == 0  # a scale change
    assert cached(always, {"b": 0.5}) > 10
    assert cached(always, None) == 0  # adapter -> base
    assert cached(always, {"a": 1.0, "b": 1.0}) == 0  # -> a set of two
    # A name re-bound to another file is another key even with the same name and scale.
    always.generate(PREFIX, max_tokens=1, adapters={"a": 1.0})
    always.unload_adapter("a")
    always.load_adapter("a", lora_dir / "b.gguf")
    assert cached(always, {"a": 1.0}) == 0
    always.unload_adapter("a")
    always.load_adapter("a", lora_dir / "a.gguf")


def test_cached_and_fresh_answers_match_without_adapters(always):
    always.reset()
    fresh = always.generate(PREFIX + " y", max_tokens=6).token_ids
    always.generate(PREFIX, max_tokens=1)
    reused = always.generate(PREFIX + " y", max_tokens=6)
    assert reused.stats.cached_tokens > 10 and reused.token_ids == fresh


def test_always_reuses_the_generated_tokens_too(always):
    always.reset()
    answer = always.generate(PREFIX, max_tokens=16)
    again = always.generate(PREFIX + answer.text + " and", max_tokens=1)
    assert again.stats.cached_tokens > len(always.tokenize(PREFIX))


def test_shift_keeps_the_protected_prefix_and_closes_the_gap(gguf_path):
    with edgegemma.load(gguf_path, n_ctx=256, n_threads=2) as engine:
        keep = "Instructions: answer briefly.\n"
        result = engine.generate(
            keep + "Once upon a time", max_tokens=400, on_overflow="shift", keep=keep
        )
        assert result.stats.truncated_tokens > 0 and result.stats.completion_tokens == 400
        backend = engine._backend
        memory = ll.llama_get_memory(backend._ctx)
        # The positions are contiguous again: the highest one is the count of cached tokens.
        assert ll.llama_memory_seq_pos_max(memory, 0) == backend._n_past - 1 < 256
        assert ll.llama_memory_seq_pos_min(memory, 0) == 0  # the protected prefix is still there


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgegemma", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_cli_adapter_with_a_scale_stream_and_stop(gguf_path, lora_dir, engine):
    engine.load_adapter("a", lora_dir / "a.gguf")
    try:
        want = engine.generate(PROMPT, max_tokens=12, adapters={"a": 0.5})
    finally:
        engine.unload_adapter("a")
    found = run_cli(
        "generate", PROMPT, "--model", str(gguf_path), "--max-tokens", "12",
        "--adapter", f"a={lora_dir / 'a.gguf'}:0.5", "--stream",
    )  # fmt: skip
    assert found.returncode == 0, found.stderr[-500:]
    assert found.stdout.rstrip("\n") == want.text
    stop = want.text[len(want.text) // 2 :][:3]
    assert stop.strip(), want.text
    found = run_cli(
        "generate", PROMPT, "--model", str(gguf_path), "--max-tokens", "12",
        "--adapter", f"a={lora_dir / 'a.gguf'}:0.5", "--stop", stop,
    )  # fmt: skip
    assert found.returncode == 0, found.stderr[-500:]
    assert found.stdout.rstrip("\n") == want.text[: want.text.find(stop)]


@pytest.mark.slow
def test_litert_lm_engine_recreation_keeps_answers(gguf_path, tmp_path):
    from backend_kits import KITS, backend_model

    model = backend_model("mediapipe", gguf_path)
    adapter = KITS["mediapipe"].adapter(model, tmp_path / "lora", 3)
    with edgegemma.load(model, backend="mediapipe", n_ctx=512, n_threads=2) as engine:
        engine.load_adapter("a", adapter)
        first = engine.generate(PROMPT, max_tokens=6, adapters={"a": 1.0}).token_ids
        base = engine.generate(PROMPT, max_tokens=6).token_ids
        for _ in range(18):  # past the 16 LoRA sessions after which the engine is recreated
            assert engine.generate(PROMPT, max_tokens=6, adapters={"a": 1.0}).token_ids == first
        assert engine.generate(PROMPT, max_tokens=6).token_ids == base
