"""pytest-benchmark suites for the engine's hot paths (benchmarks, not pass/fail timings).

    pytest benchmarks/ --benchmark-columns=min,median,mean,stddev,rounds

Each benchmark records the engine's own Stats of its last round in ``extra_info``.
"""

from __future__ import annotations

import pytest

from edgegemma.bench.workloads import load_task

PROMPT = "The capital of France is"
ROUNDS = 5
# The sensor task's few-shot prompts (~230 tokens, ~218 of them shared) make cache effects visible.
FEW_SHOT, OTHER_READING = (e.prompt for e in load_task("sensor", limit=2).examples)


def _record(benchmark, result) -> None:
    stats = result.stats
    benchmark.extra_info.update(
        prompt_tokens=stats.prompt_tokens,
        cached_tokens=stats.cached_tokens,
        completion_tokens=stats.completion_tokens,
        ttft_ms=round(stats.ttft_s * 1000, 2),
        decode_tps=round(stats.decode_tps, 1),
    )


def test_generate_32_tokens(benchmark, fresh):
    result = benchmark.pedantic(
        lambda: fresh.generate(PROMPT, max_tokens=32),
        setup=fresh.reset,
        rounds=ROUNDS,
        warmup_rounds=1,
    )
    assert result.stats.completion_tokens == 32
    _record(benchmark, result)


def test_stream_32_tokens(benchmark, fresh):
    def stream():
        with fresh.stream(PROMPT, max_tokens=32) as pieces:
            text = "".join(pieces)
        return pieces.result, text

    result, text = benchmark.pedantic(stream, setup=fresh.reset, rounds=ROUNDS, warmup_rounds=1)
    assert text == result.text
    _record(benchmark, result)


@pytest.mark.parametrize("case", ["swap", "no-swap-cold", "no-swap-cached"])
def test_adapter_swap_first_token(benchmark, fresh, case):
    """First token of the few-shot prompt under adapter a, reached by a swap from b or not."""

    def setup():
        if case == "swap":
            fresh.generate(FEW_SHOT, max_tokens=1, adapters={"b": 1.0})
        elif case == "no-swap-cold":
            fresh.reset()
        else:
            fresh.generate(FEW_SHOT, max_tokens=1, adapters={"a": 1.0})

    result = benchmark.pedantic(
        lambda: fresh.generate(FEW_SHOT, max_tokens=1, adapters={"a": 1.0}),
        setup=setup, rounds=ROUNDS, warmup_rounds=1,
    )  # fmt: skip
    assert (result.stats.cached_tokens > 0) == (case == "no-swap-cached")
    _record(benchmark, result)


@pytest.mark.parametrize("case", ["hit", "miss"])
def test_prefix_cache(benchmark, fresh, case):
    """A request whose few-shot prefix is in the KV cache (hit) or not (miss)."""

    def setup():
        fresh.reset()
        if case == "hit":  # another reading after the same instruction and examples
            fresh.generate(OTHER_READING, max_tokens=1)

    result = benchmark.pedantic(
        lambda: fresh.generate(FEW_SHOT, max_tokens=2), setup=setup, rounds=ROUNDS, warmup_rounds=1
    )
    assert (result.stats.cached_tokens > 200) == (case == "hit")
    _record(benchmark, result)
