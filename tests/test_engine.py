"""The Engine on the real llama.cpp backend and the real Gemma 3 270M."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import PROMPT

import edgegemma
from edgegemma import (
    AdapterError,
    ContextOverflowError,
    EngineClosedError,
    InvalidParameterError,
    ModelError,
    skills,
)

FRANCE = " the capital of the country of France"


def test_greedy_continuation_is_known_and_deterministic(clean_engine):
    first = clean_engine.generate(PROMPT, max_tokens=16)
    assert first.text.startswith(FRANCE)
    clean_engine.reset()
    second = clean_engine.generate(PROMPT, max_tokens=16)
    assert second.token_ids == first.token_ids
    assert first.finish_reason == "length"
    assert first.finish_detail == "max_tokens (16) reached"
    assert first.stats.completion_tokens == 16
    assert first.stats.prompt_tokens == 6  # BOS + 5 tokens
    assert first.stats.decode_tps > 0 and first.stats.prefill_tps > 0
    assert 0 < first.stats.ttft_s <= first.stats.total_s
    assert first.stats.peak_rss_mb > 200


def test_stream_yields_the_same_text_as_generate(clean_engine):
    expected = clean_engine.generate(PROMPT, max_tokens=24, stop=["largest"])
    stream = clean_engine.stream(PROMPT, max_tokens=24, stop=["largest"])
    pieces = list(stream)
    assert len(pieces) > 1
    assert "".join(pieces) == expected.text == stream.result.text
    assert stream.result.token_ids == expected.token_ids


def test_stop_string_ends_generation_and_is_cut(clean_engine):
    result = clean_engine.generate(PROMPT, max_tokens=32, stop=["France"])
    assert result.text == " the capital of the country of "
    assert result.finish_reason == "stop"
    assert result.finish_detail == "stop string 'France'"


def test_stop_string_spanning_tokens_is_not_leaked_by_the_stream(clean_engine):
    pieces = list(clean_engine.stream(PROMPT, max_tokens=32, stop=["country of Fr"]))
    assert "".join(pieces) == " the capital of the "


def test_token_id_prompt_is_taken_as_is(clean_engine):
    ids = clean_engine.tokenize(PROMPT)
    assert ids[0] == clean_engine.info.bos_id
    by_ids = clean_engine.generate(ids, max_tokens=8)
    by_text = clean_engine.generate(PROMPT, max_tokens=8)
    assert by_ids.token_ids == by_text.token_ids


def test_empty_prompt_generates_from_bos(clean_engine):
    result = clean_engine.generate("", max_tokens=4)
    assert result.stats.prompt_tokens == 1
    assert result.stats.completion_tokens == 4


def test_max_tokens_zero_only_prefills(clean_engine):
    result = clean_engine.generate(PROMPT, max_tokens=0)
    assert result.text == "" and result.token_ids == []
    assert result.finish_reason == "length"
    again = clean_engine.generate(PROMPT + " the", max_tokens=1)
    # The warmed prefix (6 tokens) was reused, down to a multiple of llama.cpp's row groups.
    assert again.stats.cached_tokens == 4


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.5},
        {"temperature": float("nan")},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"min_p": 2.0},
        {"repeat_penalty": 0.0},
        {"seed": -1},
        {"max_tokens": -1},
        {"max_tokens": 2.5},
        {"stop": [""]},
        {"stop": [3]},
        {"on_overflow": "drop_everything"},
        {"keep": -3},
        {"adapters": ["a"]},
    ],
)
def test_invalid_parameters_are_rejected_clearly(clean_engine, kwargs):
    with pytest.raises(InvalidParameterError):
        clean_engine.generate(PROMPT, **kwargs)
    assert clean_engine.generate(PROMPT, max_tokens=8).text.startswith(" the capital")


def test_invalid_token_ids_are_rejected(clean_engine):
    with pytest.raises(InvalidParameterError, match="outside the vocabulary"):
        clean_engine.generate([2, 10**9])
    with pytest.raises(InvalidParameterError):
        clean_engine.generate([])


def test_sampling_is_reproducible_with_a_seed(clean_engine):
    kwargs = {"max_tokens": 16, "temperature": 0.9, "top_k": 50, "top_p": 0.9, "seed": 1234}
    a = clean_engine.generate("Once upon a time", **kwargs)
    b = clean_engine.generate("Once upon a time", **kwargs)
    c = clean_engine.generate("Once upon a time", **{**kwargs, "seed": 99})
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_repeat_penalty_changes_a_looping_continuation(clean_engine):
    plain = clean_engine.generate(PROMPT, max_tokens=48)
    penalized = clean_engine.generate(PROMPT, max_tokens=48, repeat_penalty=1.5)
    assert plain.token_ids != penalized.token_ids


# -- adapters ----------------------------------------------------------------------------


def test_hot_swap_without_reloading_the_base(clean_engine, lora_dir: Path):
    engine = clean_engine
    backend = engine._backend
    model_pointer = backend._model
    base = engine.generate(PROMPT, max_tokens=16).token_ids

    engine.load_adapter("a", lora_dir / "a.gguf")
    engine.load_adapter("b", lora_dir / "b.gguf")
    engine.set_adapters({"a": 1.0})
    with_a = engine.generate(PROMPT, max_tokens=16).token_ids
    assert with_a != base

    engine.set_adapters(None)
    assert engine.generate(PROMPT, max_tokens=16).token_ids == base

    engine.set_adapters({"b": 1.0})
    with_b = engine.generate(PROMPT, max_tokens=16).token_ids
    assert with_b not in (base, with_a)

    engine.set_adapters({"a": 1.0})
    assert engine.generate(PROMPT, max_tokens=16).token_ids == with_a

    engine.set_adapters({"a": 0.7, "b": 0.5})
    mixed = engine.generate(PROMPT, max_tokens=16)
    assert mixed.token_ids not in (base, with_a, with_b)
    assert mixed.adapters == {"a": 0.7, "b": 0.5}

    engine.set_adapters({"a": 0.0})
    assert engine.generate(PROMPT, max_tokens=16).token_ids == base

    assert engine._backend is backend and backend._model == model_pointer


def test_per_call_adapters_restore_the_engine_set(clean_engine, lora_dir: Path):
    engine = clean_engine
    engine.load_adapter("a", lora_dir / "a.gguf")
    base = engine.generate(PROMPT, max_tokens=12).token_ids
    with_a = engine.generate(PROMPT, max_tokens=12, adapters={"a": 1.0})
    assert with_a.token_ids != base and with_a.adapters == {"a": 1.0}
    after = engine.generate(PROMPT, max_tokens=12)
    assert after.token_ids == base and after.adapters == {}
    engine.set_adapters({"a": 1.0})
    assert engine.generate(PROMPT, max_tokens=12, adapters=None).token_ids == base
    assert engine.active_adapters == {"a": 1.0}


def test_prefix_cache_never_crosses_adapter_sets(clean_engine, gguf_path: Path, lora_dir: Path):
    engine = clean_engine
    engine.load_adapter("a", lora_dir / "a.gguf")
    engine.generate(PROMPT, max_tokens=8)  # fills the cache without the adapter
    switched = engine.generate(PROMPT, max_tokens=16, adapters={"a": 1.0})
    assert switched.stats.cached_tokens == 0
    with edgegemma.load(gguf_path, n_ctx=1024, n_threads=2) as fresh:
        fresh.load_adapter("a", lora_dir / "a.gguf")
        expected = fresh.generate(PROMPT, max_tokens=16, adapters={"a": 1.0})
    assert switched.token_ids == expected.token_ids


def test_prefix_cache_reuses_a_shared_prefix_and_matches_fresh_computation(clean_engine):
    instruction = "Classify the reading as normal, warning or critical.\nReading: "
    engine = clean_engine
    engine.generate(instruction + "temp=40C", max_tokens=4)
    warm = engine.generate(instruction + "temp=95C", max_tokens=8)
    # All the instruction but what leaves 8 tokens to evaluate, as a fresh evaluation's batch
    # of 8 or more would be (test_prefix_reuse_keeps_the_kernels_batch_sizes).
    assert warm.stats.cached_tokens >= len(engine.tokenize(instruction + "temp=95C")) - 8
    engine.reset()
    cold = engine.generate(instruction + "temp=95C", max_tokens=8)
    assert cold.stats.cached_tokens == 0
    assert warm.token_ids == cold.token_ids


FISHERMAN = "Once upon a time, in a small village by the sea, there lived an old fisherman who"


def test_prefix_reuse_keeps_the_kernels_row_groups(clean_engine):
    # llama.cpp's repacked kernels multiply a batch's rows four at a time and round the rows
    # left over differently: the backend reuses a prefix only down to a multiple of four, so
    # these prompts' label log-probabilities after a reused prefix are the fresh ones (they
    # were up to 0.2 apart before; docs/design/reliability.md says what still differs).
    engine = clean_engine
    instruction = "Classify the reading as normal, warning or critical.\nReading: "
    prompts = [instruction + e.prompt for e in skills.examples("sensor", "test")[:6]]
    fresh = []
    for prompt in prompts:
        engine.reset()
        fresh.append(engine.classify(prompt, [" normal", " warning", " critical"]).logprobs)
    warm = [engine.classify(p, [" normal", " warning", " critical"]).logprobs for p in prompts]
    assert warm == fresh


def test_exact_reuse_stops_where_the_generated_tokens_begin(clean_engine):
    # Generated tokens were evaluated one at a time; a fresh evaluation of the same text batches
    # them, and llama.cpp's repacked kernels round a lone row differently: reusing their keys
    # and values moved this continuation's log-probabilities by up to 0.12 (and changed 3 of 8
    # greedy answers in a probe on the default model) until "exact" stopped reusing them.
    engine = clean_engine
    answer = engine.generate(FISHERMAN, max_tokens=21)
    follow = FISHERMAN + answer.text + " Then"
    warm = engine.generate(follow, max_tokens=8, logprobs=3)
    assert 0 < warm.stats.cached_tokens <= len(engine.tokenize(FISHERMAN))
    engine.reset()
    cold = engine.generate(follow, max_tokens=8, logprobs=3)
    assert warm.token_ids == cold.token_ids
    assert warm.logprobs == cold.logprobs


def test_prefix_reuse_keeps_the_kernels_batch_sizes(clean_engine):
    # llama.cpp multiplies its unrepacked K-quant layers (Q6_K) with another kernel in batches
    # of 8 rows or more than below: every prefix cached by one prompt and reused by another
    # (any length, any multiple of four) gives the fresh logits. Before the backend took
    # that into account, 6 of these 29 cases were up to 0.1 apart.
    engine = clean_engine
    text = FISHERMAN + " had a small boat and a big dog named Max, and every morning he went out"
    tokens = engine.tokenize(text)
    differing = []
    for n in (29, 30, 31, 36):
        engine.reset()
        fresh = engine.generate(tokens[:n], max_tokens=2, logprobs=2).logprobs
        for cached in range(4, n, 4):
            engine.reset()
            engine.generate(tokens[:cached], max_tokens=0)
            if engine.generate(tokens[:n], max_tokens=2, logprobs=2).logprobs != fresh:
                differing.append((n, cached))
    assert differing == []


def test_no_prefix_reuse_under_adapters_by_default(clean_engine, lora_dir: Path):
    # Under a LoRA, llama.cpp's logits depend on how the prompt was batched: "exact" does not
    # reuse, so an answer never depends on the call before it.
    engine = clean_engine
    engine.load_adapter("a", lora_dir / "a.gguf")
    engine.generate(FISHERMAN, max_tokens=1, adapters={"a": 1.0})
    after = engine.generate(FISHERMAN + " told", max_tokens=24, adapters={"a": 1.0})
    assert after.stats.cached_tokens == 0
    engine.reset()
    assert (
        engine.generate(FISHERMAN + " told", max_tokens=24, adapters={"a": 1.0}).token_ids
        == after.token_ids
    )
    engine.generate(FISHERMAN, max_tokens=1)
    assert (
        engine.generate(FISHERMAN + " told", max_tokens=4).stats.cached_tokens > 0
    )  # no adapter: reused
    with pytest.raises(InvalidParameterError, match="prefix_cache"):
        edgegemma.load(engine.model_path, prefix_cache="sometimes")


def test_prefix_reuse_under_a_float16_adapter_matches_fresh_computation(gguf_path: Path):
    # Float16 LoRA tensors make llama.cpp's batching dependence far more frequent; the backend
    # loads them as float32, so with the shipped (float16) emoji adapter "always" is exact too.
    from edgegemma import skills

    with edgegemma.load(gguf_path, n_ctx=512, n_threads=2, prefix_cache="always") as engine:
        engine.load_adapter("emoji", skills.adapter_path("emoji"))
        for tail in (" every", " always", " told"):
            engine.reset()
            fresh = engine.generate(FISHERMAN + tail, max_tokens=24, adapters={"emoji": 1.0})
            engine.reset()
            engine.generate(FISHERMAN, max_tokens=1, adapters={"emoji": 1.0})
            warm = engine.generate(FISHERMAN + tail, max_tokens=24, adapters={"emoji": 1.0})
            assert warm.stats.cached_tokens > 0
            assert warm.token_ids == fresh.token_ids, tail


def test_unloading_an_active_adapter_is_refused(clean_engine, lora_dir: Path):
    clean_engine.load_adapter("a", lora_dir / "a.gguf")
    clean_engine.set_adapters({"a": 1.0})
    with pytest.raises(AdapterError, match="active set"):
        clean_engine.unload_adapter("a")
    clean_engine.set_adapters(None)
    clean_engine.unload_adapter("a")
    assert clean_engine.adapters == {}
    with pytest.raises(AdapterError, match="no adapter named"):
        clean_engine.set_adapters({"a": 1.0})


def test_unload_after_per_call_use_then_reload(clean_engine, lora_dir: Path):
    engine = clean_engine
    engine.load_adapter("a", lora_dir / "a.gguf")
    first = engine.generate(PROMPT, max_tokens=12, adapters={"a": 1.0}).token_ids
    engine.unload_adapter("a")  # was attached by the last call: detached before freeing
    engine.load_adapter("a", lora_dir / "b.gguf")  # same name, other file: cache must not match
    assert engine.generate(PROMPT, max_tokens=12, adapters={"a": 1.0}).token_ids != first


@pytest.mark.parametrize(
    ("filename", "message"),
    [
        ("other-arch.gguf", "made for a 'llama' model"),
        ("wrong-shape.gguf", "maps 704 -> 1024 but the base tensor maps 640 -> 1024"),
        ("truncated.gguf", "truncated or corrupt|needs .* more bytes"),
        ("not-gguf.gguf", "bad magic"),
        ("missing.gguf", "not found"),
    ],
)
def test_bad_adapters_are_refused_and_the_engine_still_works(
    clean_engine, lora_dir, filename, message
):
    base = clean_engine.generate(PROMPT, max_tokens=12).token_ids
    with pytest.raises(AdapterError, match=message):
        clean_engine.load_adapter("bad", lora_dir / filename)
    assert "bad" not in clean_engine.adapters
    assert clean_engine.generate(PROMPT, max_tokens=12).token_ids == base


def test_model_file_is_not_an_adapter(clean_engine, gguf_path: Path):
    with pytest.raises(AdapterError, match="not a LoRA adapter"):
        clean_engine.load_adapter("model", gguf_path)


def test_llama_cpp_reason_is_reported_for_what_only_it_checks(clean_engine, base_header, tmp_path):
    import gguf
    import llama_cpp  # noqa: F401 -- its high-level API installs its own logger on import
    import numpy as np

    # A well-formed adapter whose aLoRA invocation tokens have the wrong element type: only
    # llama.cpp checks that, and its log line must reach the exception (also after
    # llama-cpp-python's logger was installed, which took the line before).
    path = tmp_path / "alora.gguf"
    n_in, n_out = base_header.tensors["blk.0.attn_q.weight"].shape
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", 8.0)
    writer.add_array("adapter.alora.invocation_tokens", ["not", "ids"])
    writer.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((8, n_in), np.float32))
    writer.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((n_out, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(AdapterError, match="invalid gguf element type"):
        clean_engine.load_adapter("alora", path)
    assert clean_engine.generate(PROMPT, max_tokens=8).text.startswith(" the capital")


def test_adapter_on_a_vector_tensor_is_refused(clean_engine, base_header, tmp_path):
    from loras import random_lora

    path = random_lora(tmp_path / "norm.gguf", base_header, seed=5, targets=("attn_norm",))
    with pytest.raises(AdapterError, match="not a weight matrix"):
        clean_engine.load_adapter("norm", path)


# -- context limits ----------------------------------------------------------------------


def _long_prompt(engine, n_tokens: int) -> str:
    words = " ".join(f"word{i}" for i in range(n_tokens))
    ids = engine.tokenize(words)
    return engine.detokenize(ids[1:n_tokens])


def test_overflow_error_is_the_default_and_explains_the_numbers(clean_engine):
    prompt = _long_prompt(clean_engine, 1000)
    n_prompt = len(clean_engine.tokenize(prompt))
    with pytest.raises(ContextOverflowError) as info:
        clean_engine.generate(prompt, max_tokens=100)
    message = str(info.value)
    assert (
        f"{n_prompt} tokens" in message
        and "max_tokens is 100" in message
        and "n_ctx=1024" in message
    )
    assert info.value.prompt_tokens == n_prompt and info.value.n_ctx == 1024
    assert clean_engine.generate(PROMPT, max_tokens=8).text.startswith(" the capital")


def test_max_tokens_beyond_the_window_is_an_error_not_a_silent_cut(clean_engine):
    with pytest.raises(ContextOverflowError, match="max_tokens is 5000"):
        clean_engine.generate(PROMPT, max_tokens=5000)


def test_max_tokens_none_runs_to_the_window_and_says_so(gguf_path):
    with edgegemma.load(gguf_path, n_ctx=256, n_threads=2) as small:
        result = small.generate(PROMPT, max_tokens=None)
    assert result.finish_reason in ("length", "stop")
    if result.finish_reason == "length":
        assert result.finish_detail == "context window full (n_ctx=256)"
        assert result.stats.prompt_tokens + result.stats.completion_tokens == 256


def test_truncate_left_keeps_the_protected_prefix(clean_engine):
    instruction = "Answer in one word.\n"
    filler = _long_prompt(clean_engine, 1100)
    question = "\nThe capital of France is"
    prompt = instruction + filler + question
    result = clean_engine.generate(
        prompt, max_tokens=8, on_overflow="truncate_left", keep=instruction
    )
    stats = result.stats
    assert stats.truncated_tokens > 0
    assert stats.prompt_tokens + 8 == clean_engine.n_ctx
    # Same tokens as evaluating the truncated prompt directly.
    ids = clean_engine.tokenize(prompt)
    kept = len(clean_engine.tokenize(instruction))
    direct = ids[:kept] + ids[kept + stats.truncated_tokens :]
    clean_engine.reset()
    assert clean_engine.generate(direct, max_tokens=8).token_ids == result.token_ids


def test_truncate_left_cannot_drop_protected_tokens(clean_engine):
    prompt = _long_prompt(clean_engine, 1000)
    with pytest.raises(ContextOverflowError, match="protected"):
        clean_engine.generate(prompt, max_tokens=100, on_overflow="truncate_left", keep=990)


def test_keep_string_must_prefix_the_prompt(clean_engine):
    with pytest.raises(InvalidParameterError, match="prefix"):
        clean_engine.generate(PROMPT, keep="Paris", on_overflow="truncate_left")


def test_shift_continues_past_the_window(gguf_path):
    with edgegemma.load(gguf_path, n_ctx=256, n_threads=2, on_overflow="shift") as small:
        result = small.generate(PROMPT, max_tokens=400, keep=3)
        assert result.stats.completion_tokens == 400 or result.finish_reason == "stop"
        assert result.stats.truncated_tokens > 0
        again = small.generate(PROMPT, max_tokens=8)
    assert again.text.startswith(" the capital")


def test_shift_needs_a_finite_max_tokens(clean_engine):
    with pytest.raises(InvalidParameterError, match="finite max_tokens"):
        clean_engine.generate(PROMPT, max_tokens=None, on_overflow="shift")


def test_shift_refuses_a_prompt_that_fills_the_window(clean_engine):
    with pytest.raises(ContextOverflowError, match="prompt alone"):
        clean_engine.generate(_long_prompt(clean_engine, 1100), max_tokens=8, on_overflow="shift")


def test_n_ctx_is_rounded_up_to_a_multiple_of_256(gguf_path):
    with edgegemma.load(gguf_path, n_ctx=300, n_threads=2) as e:
        assert e.n_ctx == 512
    with pytest.raises(InvalidParameterError, match="trained for"):
        edgegemma.load(gguf_path, n_ctx=40000)


# -- bad model files ---------------------------------------------------------------------


@pytest.mark.parametrize("cut", [3, 24, 1000, 5_000_000, 200_000_000, -1])
def test_truncated_model_is_refused_before_llama_cpp_sees_it(gguf_path, tmp_path, cut):
    bad = tmp_path / "cut.gguf"
    with open(gguf_path, "rb") as src, open(bad, "wb") as dst:
        size = gguf_path.stat().st_size
        dst.write(src.read(size - 1 if cut == -1 else cut))
    with pytest.raises(ModelError):
        edgegemma.load(bad)


def test_garbage_and_missing_model_files(tmp_path):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + b"\xff" * 100)
    with pytest.raises(ModelError):
        edgegemma.load(garbage)
    with pytest.raises(ModelError):
        edgegemma.load(tmp_path / "nowhere.gguf")


def test_adapter_file_is_not_a_model(lora_dir):
    with pytest.raises(ModelError, match="not a model"):
        edgegemma.load(lora_dir / "a.gguf")


# -- lifetime (threads, cancellation, timeouts: test_concurrency.py) ---------------------


def test_closed_engine_raises(gguf_path):
    engine = edgegemma.load(gguf_path, n_ctx=256, n_threads=2)
    engine.close()
    engine.close()
    with pytest.raises(EngineClosedError):
        engine.generate(PROMPT)
