"""Engine policy on the scripted backend: exhaustive, fast, no model.

The real-model tests (test_engine.py and the per-backend suites) show that the policy works
on each runtime; these show that it is right for every input hypothesis can think of: stop
strings across token and UTF-8 boundaries, the context budget and its overflow policies, the
KV cache key across adapter sets, thread-count following.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgegemma import ContextOverflowError, Engine, InvalidParameterError, Stream
from edgegemma.backends.scripted import BOS, ScriptedBackend
from edgegemma.threads import ThreadPolicy

texts = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
stops = st.lists(st.text(min_size=1, max_size=4), max_size=3)


class SameLengthBackend(ScriptedBackend):
    """Batches prompts of one length only, from two on: what ONNX Runtime GenAI declares."""

    features = dataclasses.replace(
        ScriptedBackend.features, batch_min=2, batch_same_length=True, batch_join=False
    )


def engine_for(reply: str, **options: object) -> tuple[Engine, ScriptedBackend]:
    backend = ScriptedBackend(lambda prompt, adapters: reply, **options)  # type: ignore[arg-type]
    return Engine(backend, model_path=Path("scripted")), backend


def reference(reply: str, stop: list[str], max_tokens: int) -> tuple[str, str]:
    """What the engine must answer: the reply cut at max_tokens bytes, then at the first stop."""
    data = reply.encode("utf-8")
    limited = data[:max_tokens].decode("utf-8", errors="replace")
    hits = [(limited.find(s), s) for s in stop if s in limited]
    if hits:
        return limited[: min(hits)[0]], "stop"
    return limited, "length" if len(data) >= max_tokens else "stop"


@settings(max_examples=300, deadline=None)
@given(reply=texts, stop=stops, max_tokens=st.integers(0, 60))
def test_stop_strings_and_limits_match_the_reference(reply, stop, max_tokens):
    engine, _ = engine_for(reply)
    pieces = list(stream := engine.stream("p", max_tokens=max_tokens, stop=stop))
    result = stream.result
    want_text, want_reason = reference(reply, stop, max_tokens)
    if max_tokens == 0:
        want_text, want_reason = "", "length"
    assert result.text == want_text
    assert "".join(pieces) == result.text, "streamed pieces are the text, nothing held back"
    assert result.finish_reason == want_reason
    assert not any(s in result.text for s in stop)
    assert result.stats.completion_tokens <= max_tokens


@settings(max_examples=200, deadline=None)
@given(
    prompt=st.text(st.characters(codec="ascii"), min_size=1, max_size=80),
    max_tokens=st.integers(1, 80),
    keep=st.integers(0, 10),
    policy=st.sampled_from(["error", "truncate_left"]),
)
def test_the_context_budget_is_never_exceeded_nor_silently_cut(prompt, max_tokens, keep, policy):
    engine, backend = engine_for("x" * 100, n_ctx=64)
    n_prompt = 1 + len(prompt)  # BOS and one token per byte
    keep = min(keep, n_prompt)
    try:
        result = engine.generate(prompt, max_tokens=max_tokens, on_overflow=policy, keep=keep)
    except ContextOverflowError as exc:
        assert n_prompt + max_tokens > 64
        assert exc.n_ctx == 64 and exc.prompt_tokens == n_prompt
        assert policy == "error" or n_prompt - max(keep, 1) - 1 < n_prompt + max_tokens - 64
        return
    started = [c for c in backend.calls if c.method == "start"][-1].args["tokens"]
    assert len(started) + max_tokens <= 64
    assert result.stats.completion_tokens == max_tokens  # the reply is long: never shrunk
    if policy == "truncate_left":
        assert result.stats.truncated_tokens == max(0, n_prompt + max_tokens - 64)
        assert started[: max(keep, 1)] == [BOS, *prompt.encode()][: max(keep, 1)]
    else:
        assert result.stats.truncated_tokens == 0


def test_shift_keeps_the_protected_prefix_and_generates_on():
    engine, backend = engine_for("y" * 200, n_ctx=32)
    result = engine.generate("abcdefgh", max_tokens=60, on_overflow="shift", keep="abc")
    assert result.stats.completion_tokens == 60
    shifts = [c.args for c in backend.calls if c.method == "shift"]
    assert shifts and all(s["keep"] == 4 for s in shifts)  # BOS + "abc"
    assert backend.cache[:4] == [BOS, *b"abc"]


adapter_sets = st.sampled_from([None, {"a": 1.0}, {"a": 0.5}, {"b": 1.0}, {"a": 1.0, "b": 1.0}])


@settings(max_examples=100, deadline=None)
@given(
    calls=st.lists(
        st.tuples(
            st.sampled_from(["shared prefix one", "shared prefix two", "other"]), adapter_sets
        ),
        min_size=1,
        max_size=8,
    )
)
def test_the_kv_cache_is_reused_only_under_the_same_adapter_set(tmp_path_factory, calls):
    folder = tmp_path_factory.mktemp("adapters")
    engine, backend = engine_for("z")
    for name in ("a", "b"):
        (folder / f"{name}.bin").write_bytes(b"")
        engine.load_adapter(name, folder / f"{name}.bin")
    previous = None
    for prompt, adapters in calls:
        engine.generate(prompt, max_tokens=1, adapters=adapters)
        start = [c for c in backend.calls if c.method == "start"][-1].args
        key = {f"{k}.bin": v for k, v in (adapters or {}).items()}
        assert start["adapters"] == key
        if start["reuse"]:
            assert previous is not None and previous == key
        previous = key


def test_a_rebound_adapter_name_is_a_new_cache_key(tmp_path):
    engine, backend = engine_for("z")
    (tmp_path / "one.bin").write_bytes(b"")
    (tmp_path / "two.bin").write_bytes(b"")
    engine.load_adapter("skill", tmp_path / "one.bin")
    engine.generate("same prompt", max_tokens=1, adapters={"skill": 1.0})
    engine.unload_adapter("skill")
    engine.load_adapter("skill", tmp_path / "two.bin")
    engine.generate("same prompt", max_tokens=1, adapters={"skill": 1.0})
    last = [c for c in backend.calls if c.method == "start"][-1].args
    assert last["adapters"] == {"two.bin": 1.0} and last["reuse"] == 0


def test_unsupported_sampling_is_refused_before_the_cache_is_touched():
    backend = ScriptedBackend(lambda p, a: "ok")
    backend.features = type(backend.features)(sampling=frozenset())  # a backend without min_p
    engine = Engine(backend, model_path=Path("scripted"))
    engine.generate("warm", max_tokens=1)
    starts = len([c for c in backend.calls if c.method == "start"])
    with pytest.raises(InvalidParameterError, match="no min_p"):
        engine.generate("warm", max_tokens=1, min_p=0.1)
    assert len([c for c in backend.calls if c.method == "start"]) == starts
    assert engine.generate("warm", max_tokens=1).text == "o"


def test_threads_follow_the_policy_per_call():
    backend = ScriptedBackend(lambda p, a: "ok")

    class TwoThenOne(ThreadPolicy):
        answers = iter([2, 1, 1, 1, 1, 1])

        def threads(self) -> int:
            return next(self.answers, 1)

    engine = Engine(backend, model_path=Path("scripted"), threads=TwoThenOne(2, fixed=False))
    engine.generate("a", max_tokens=2)
    assert [c.args["n_threads"] for c in backend.calls if c.method == "set_threads"] == [1]
    assert backend.threads == 1


def test_a_closed_stream_cancels_and_the_engine_answers_again():
    engine, _ = engine_for("abcdef")
    stream = engine.stream("p", max_tokens=10)
    assert next(stream) == "a"
    stream.close()
    assert stream.result.finish_reason == "cancelled"
    assert engine.generate("p", max_tokens=10).text == "abcdef"


@settings(max_examples=150, deadline=None)
@given(
    prompts=st.lists(st.text(st.characters(codec="ascii"), max_size=30), max_size=12),
    stop=stops,
    max_tokens=st.integers(0, 40),
    n_ctx=st.sampled_from([64, 256]),
    kind=st.sampled_from([ScriptedBackend, SameLengthBackend]),
)
def test_generate_many_is_one_generate_each(prompts, stop, max_tokens, n_ctx, kind):
    # The answer depends on the prompt, so sequences that run together end at different
    # rounds; the scripted sequences fail if one is driven a token ahead of another.
    def reply(prompt: str, adapters: dict[str, float]) -> str:
        return (prompt[::-1] + " é€ done")[: len(prompt) % 17 + 3]

    backend = kind(reply, n_ctx=n_ctx)
    engine = Engine(backend, model_path=Path("scripted"))
    options = {"max_tokens": max_tokens, "stop": stop, "on_overflow": "truncate_left"}
    together = engine.generate_many(prompts, **options)
    alone = [engine.generate(p, **options) for p in prompts]
    assert [(r.text, r.token_ids, r.finish_reason, r.finish_detail) for r in together] == [
        (r.text, r.token_ids, r.finish_reason, r.finish_detail) for r in alone
    ]
    # (the scripted backend fails a batch of the wrong size or of mixed lengths where its
    # features ask for one length)
    batches = [c.args["prompts"] for c in backend.calls if c.method == "batch"]
    assert sum(len(b) for b in batches) <= len(prompts)
    fewest = kind.features.batch_min
    assert all(len(b) >= fewest for b in batches), "fewer than batch_min ran one by one"
    if kind.features.batch_same_length:  # prompts are at most 30 bytes: nothing is truncated
        lengths = Counter(len(p.encode()) for p in prompts)
        enough = any(n >= fewest for n in lengths.values())
    else:
        enough = len(prompts) >= fewest
    if enough and max_tokens * fewest + fewest * 32 <= n_ctx:
        assert batches, "prompts that fit together ran together"


@pytest.mark.parametrize("kind", [ScriptedBackend, SameLengthBackend])
def test_classify_many_is_one_classify_each(kind):
    backend = kind(lambda p, a: "ok")
    engine = Engine(backend, model_path=Path("scripted"))
    prompts = ["a", "bc", "déf", "", "xy", "b"]
    labels = [" x", " yz", " é"]
    together = engine.classify_many(prompts, labels)
    assert [(c.label, c.logprobs) for c in together] == [
        (c.label, c.logprobs) for c in (engine.classify(p, labels) for p in prompts)
    ]
    groups = [c.args["prompts"] for c in backend.calls if c.method == "score_many"]
    assert sorted(map(len, groups)) == ([1, 1, 2, 2] if kind.features.batch_same_length else [6])


def test_run_together_streams_each_piece_and_cancels_one_stream():
    def reply(prompt: str, adapters: dict[str, float]) -> str:
        return f"<{prompt}> and more text"

    backend = ScriptedBackend(reply)
    engine = Engine(backend, model_path=Path("scripted"))
    prompts = ["a", "b", "c", "d", "e"]
    options = [{"max_tokens": 12}, {"max_tokens": 30, "stop": ["more"]}, {"max_tokens": 5}]
    streams = [engine.stream(p, **options[i % 3]) for i, p in enumerate(prompts)]
    texts = ["" for _ in prompts]
    for index, piece in engine.run_together(streams):
        texts[index] += piece
        if index == 3 and len(texts[3]) == 2:
            streams[3].close()  # the others go on
    alone = [engine.generate(p, **options[i % 3]) for i, p in enumerate(prompts)]
    for i, (stream, reference) in enumerate(zip(streams, alone)):
        assert texts[i] == stream.result.text
        if i == 3:
            assert stream.result.finish_reason == "cancelled" and stream.result.text == "<d"
        else:
            assert stream.result.text == reference.text
            assert stream.result.finish_reason == reference.finish_reason
        assert stream.result.stats.batch_size == 5
    assert [len(c.args["prompts"]) for c in backend.calls if c.method == "batch"] == [5]
    # Other sampling settings (or adapter sets) make other batches; a stream already
    # iterated is refused.
    mixed = [engine.stream(p, max_tokens=4, temperature=0.0 if i < 4 else 0.5, seed=1)
             for i, p in enumerate(prompts)]  # fmt: skip
    assert sorted(i for i, _ in engine.run_together(mixed)) == sorted(
        i for i, stream in enumerate(mixed) for _ in range(stream.result.stats.completion_tokens)
    )
    assert [s.result.stats.batch_size for s in mixed] == [4, 4, 4, 4, 1]
    used = engine.stream("x", max_tokens=2)
    next(used)
    with pytest.raises(InvalidParameterError, match="not been iterated"):
        next(engine.run_together([used]))
    used.close()


@settings(max_examples=150, deadline=None)
@given(requests=st.lists(st.tuples(stops, st.integers(0, 30)), min_size=4, max_size=8))
def test_run_together_answers_as_each_stream_alone(requests):
    """Whatever each stream's stop strings and limit: a stream that ends holding back text
    (a partial stop string at its limit) leaves the batch without stalling the others."""

    def reply(prompt: str, adapters: dict[str, float]) -> str:
        return f"{prompt}: caf\u00e9 \u2192 {prompt * 3}!? done"

    backend = ScriptedBackend(reply)
    engine = Engine(backend, model_path=Path("scripted"))
    prompts = [chr(ord("a") + i) for i in range(len(requests))]
    streams = [engine.stream(p, max_tokens=n, stop=stop) for p, (stop, n) in zip(prompts, requests)]
    texts = ["" for _ in streams]
    for index, piece in engine.run_together(streams):
        texts[index] += piece
    for p, (stop, n), stream, text in zip(prompts, requests, streams, texts):
        alone = engine.generate(p, max_tokens=n, stop=stop)
        assert (text, stream.result.text, stream.result.finish_reason) == (
            alone.text,
            alone.text,
            alone.finish_reason,
        )


@settings(max_examples=150, deadline=None)
@given(
    arrivals=st.lists(
        st.tuples(st.integers(0, 40), stops, st.integers(0, 30), st.booleans()),
        min_size=1,
        max_size=10,
    ),
    n_ctx=st.sampled_from([96, 256]),
)
def test_streams_added_while_others_run_answer_as_alone(arrivals, n_ctx):
    """Streams added while a batch runs (after some number of pieces) join it where they have
    its sampling settings and fit, else run after; each answers as it would alone."""

    def reply(prompt: str, adapters: dict[str, float]) -> str:
        return f"{prompt}: caf\u00e9 {prompt * 2}!"

    backend = ScriptedBackend(reply, n_ctx=n_ctx)
    engine = Engine(backend, model_path=Path("scripted"))
    requests: list[tuple[str, list[str], int, bool]] = []

    def make(name: str, stop: list[str], n: int, hot: bool) -> Stream:
        requests.append((name, stop, n, hot))
        sampling = {"temperature": 0.5, "seed": 1} if hot else {}
        return engine.stream(name, max_tokens=n, stop=stop, **sampling)

    streams = [make(f"p{i}", *arrivals[0][1:]) for i in range(4)]  # a batch from the start
    together = engine.run_together(streams)
    pending = sorted(enumerate(arrivals), key=lambda item: item[1][0])
    texts = ["" for _ in streams]
    for seen, (index, piece) in enumerate(together, start=1):
        texts[index] += piece
        while pending and pending[0][1][0] <= seen:
            i, (_, stop, n, hot) = pending.pop(0)
            streams.append(make(f"q{i}", stop, n, hot))
            texts.append("")
            assert together.add(streams[-1]) == len(streams) - 1
    with pytest.raises(InvalidParameterError, match="finished"):
        together.add(engine.stream("late", max_tokens=1))
    for i, (_, stop, n, hot) in pending:  # arrived after the last piece: a new run
        streams.append(make(f"q{i}", stop, n, hot))
        texts.append("".join(piece for _, piece in engine.run_together([streams[-1]])))
    for (name, stop, n, hot), stream, text in zip(requests, streams, texts):
        sampling = {"temperature": 0.5, "seed": 1} if hot else {}
        alone = engine.generate(name, max_tokens=n, stop=stop, **sampling)
        assert (text, stream.result.text, stream.result.finish_reason) == (
            alone.text,
            alone.text,
            alone.finish_reason,
        )
    # (the scripted backend fails a join in the middle of a round or beyond the batch size)
    assert all(len(c.args["prompt"]) == 3 for c in backend.calls if c.method == "join")


def test_a_stream_added_while_a_batch_runs_joins_it():
    backend = ScriptedBackend(lambda prompt, adapters: f"<{prompt}> " * 6)
    engine = Engine(backend, model_path=Path("scripted"))
    streams = [engine.stream(p, max_tokens=20) for p in "abcd"]
    together = engine.run_together(streams)
    pieces = [next(together) for _ in range(8)]
    late = engine.stream("e", max_tokens=20)
    other = engine.stream("f", max_tokens=20, temperature=0.5, seed=3)  # another kind: after
    assert (together.add(late), together.add(other)) == (4, 5)
    rest = list(together)
    assert [c.method for c in backend.calls if c.method in ("batch", "join")] == ["batch", "join"]
    assert late.result.text == engine.generate("e", max_tokens=20).text
    assert late.result.stats.batch_size == 5 and other.result.stats.batch_size == 1
    assert {i for i, _ in pieces + rest} == {0, 1, 2, 3, 4, 5}
    with pytest.raises(InvalidParameterError, match="not been iterated"):
        engine.run_together([late])
    with pytest.raises(InvalidParameterError, match="not been iterated"):
        engine.run_together([streams[0], streams[0]])


def test_with_batch_min_1_a_lone_stream_is_a_batch_others_join():
    backend = ScriptedBackend(lambda prompt, adapters: f"<{prompt}> " * 4)
    engine = Engine(backend, model_path=Path("scripted"))
    alone = engine.stream("a", max_tokens=16)
    together = engine.run_together([alone], batch_min=1)
    assert next(together) == (0, "<")
    late = engine.stream("b", max_tokens=16)
    together.add(late)
    list(together)
    assert [c.method for c in backend.calls if c.method in ("start", "batch", "join")] == [
        "batch",
        "join",
    ]
    assert (alone.result.text, late.result.text) == ("<a> " * 4, "<b> " * 4)
    assert (alone.result.stats.batch_size, late.result.stats.batch_size) == (1, 2)
    with pytest.raises(InvalidParameterError, match="batch_min"):
        engine.run_together([], batch_min=0)


@pytest.mark.parametrize("kind", [{}, {"temperature": 0.5, "seed": 1}])
def test_a_stream_closed_before_its_turn_never_starts(kind):
    # Closed before its turn (a server's client that left while its request waited): the
    # stream neither joins the running batch (its kind) nor starts a batch after it.
    backend = ScriptedBackend(lambda prompt, adapters: f"<{prompt}>")
    engine = Engine(backend, model_path=Path("scripted"))
    first = [engine.stream(p, max_tokens=8) for p in "abcd"]
    together = engine.run_together(first)
    assert next(together) == (0, "<")
    waiting = [engine.stream(p, max_tokens=8, **kind) for p in "wxyz"]
    for stream in waiting:
        together.add(stream)
        stream.close()
    assert "".join(piece for _, piece in together) == "<<<abcd>>>>"
    assert [s.result.text for s in first] == ["<a>", "<b>", "<c>", "<d>"]
    assert not any(s.finished for s in waiting)
    assert [c.method for c in backend.calls] == ["batch"]


@pytest.mark.parametrize("policy", ["exact", "always"])
def test_exact_reuses_the_prompt_and_not_the_answer(policy):
    # Generated tokens were decoded one at a time: "exact" never reuses their KV (a fresh
    # evaluation batches them), "always" does.
    backend = ScriptedBackend(lambda prompt, adapters: " reply")
    engine = Engine(backend, model_path=Path("scripted"), prefix_cache=policy)
    first = engine.generate("Hello", max_tokens=4)
    assert first.text == " rep"
    engine.generate("Hello" + first.text + " more", max_tokens=1)
    reuse = [c for c in backend.calls if c.method == "start"][-1].args["reuse"]
    prompt = first.stats.prompt_tokens  # BOS and "Hello"
    assert reuse == prompt if policy == "exact" else reuse > prompt
