"""Classify, constrained output and logprobs, on the real model, on every backend that can."""

from __future__ import annotations

import json
import math
import time

import jsonschema
import pytest
from backend_kits import BACKENDS
from conftest import PROMPT

import edgegemma
from edgegemma import (
    BackendUnavailableError,
    ContextOverflowError,
    EdgeGemmaError,
    InvalidParameterError,
    TimedOutError,
    skills,
)
from edgegemma.sampling import SamplingParams

LOGITS = ["llamacpp", "onnx"]
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "country": {"type": "string", "maxLength": 12},
        "size": {"enum": ["small", "medium", "large"]},
        "capital": {"type": "boolean"},
    },
    "required": ["city", "country", "size", "capital"],
    "additionalProperties": False,
}
LABELS = [" normal", " warning", " critical"]


@pytest.fixture
def opened(engines, backend):
    """(engine on ``backend``, its greedy 8 tokens of PROMPT)."""
    return engines(backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_classify_scores_every_label_after_one_prompt(opened, backend):
    engine, reference = opened
    found = engine.classify("The capital of France is", [" Paris", " the", " banana"])
    assert set(found.scores) == {" Paris", " the", " banana"}
    assert math.isclose(sum(found.scores.values()), 1.0, rel_tol=1e-9)
    assert found.label == max(found.scores, key=found.scores.get)
    assert found.scores[" banana"] < found.scores[" the"]
    for label, value in found.logprobs.items():
        assert value < 0 and math.isfinite(value), label
    # A label of several tokens is the sum over its tokens.
    several = engine.classify("The capital of France is", [" the capital city", " the"])
    assert several.logprobs[" the capital city"] < several.logprobs[" the"]
    assert engine.generate(PROMPT, max_tokens=8).token_ids == reference


@pytest.mark.parametrize("backend", BACKENDS)
def test_classify_with_a_timeout_scores_alike_and_a_long_one_stops(opened, backend):
    """With a timeout the labels are scored a few dozen at a time: the same scores; a label
    set too large for the time raises TimedOutError early and the engine goes on."""
    engine, reference = opened
    labels = [f" w{i}" for i in range(40)]  # two scoring calls with a timeout
    plain = engine.classify("Pick a word:", labels)
    timed = engine.classify("Pick a word:", labels, timeout=600)
    assert timed.logprobs == pytest.approx(plain.logprobs, abs=1e-4) and timed.label == plain.label
    many = [f" label number {i}" for i in range(5000)]
    started = time.monotonic()
    with pytest.raises(TimedOutError, match="classify took longer than 0.2 s"):
        engine.classify("Pick:", many, timeout=0.2)
    assert time.monotonic() - started < 60
    with pytest.raises(InvalidParameterError, match="timeout must be a positive number"):
        engine.classify("Pick:", labels, timeout=0)
    assert engine.generate(PROMPT, max_tokens=8).token_ids == reference


@pytest.mark.parametrize("backend", BACKENDS)
def test_classify_with_the_sensor_skill(opened, backend, gguf_path):
    engine, reference = opened
    engine.load_adapter("sensor", skills.adapter_path("sensor", backend, model=str(gguf_path)))
    try:
        examples = skills.examples("sensor", "test")[:12]
        correct = 0
        for example in examples:
            found = engine.classify(example.prompt, LABELS, adapters={"sensor": 1.0})
            correct += found.label.strip() == example.completion.strip()
        assert correct >= 10, correct
        many = engine.classify_many(
            [e.prompt for e in examples[:3]], LABELS, adapters={"sensor": 1.0}
        )
        assert [m.label for m in many] == [
            engine.classify(e.prompt, LABELS, adapters={"sensor": 1.0}).label for e in examples[:3]
        ]
    finally:
        engine.unload_adapter("sensor")
    assert engine.generate(PROMPT, max_tokens=8).token_ids == reference


def test_classify_many_batches_prompts_on_llamacpp(engine):
    # One batch holds several prompts (their shared prefix evaluated once), the next batch
    # the rest; labels of several tokens branch from each prompt inside the batch.
    assert engine.features.batch
    instruction = "Classify the reading as normal, warning or critical.\nReading: "
    readings = [e.prompt for e in skills.examples("sensor", "test")[:14]]
    prompts = [instruction + r for r in readings] + ["Hi", engine.tokenize("The capital of")]
    labels = [" normal", " warning sign", " critical failure of the pump", " x"]
    many = engine.classify_many(prompts, labels)
    assert len(many) == len(prompts)
    for prompt, found in zip(prompts, many):
        engine.reset()
        alone = engine.classify(prompt, labels)
        assert found.prompt_tokens == alone.prompt_tokens
        # Batched rows round differently in llama.cpp's kernels (docs: Batches): close, and
        # the same label wherever the top two are not a near-tie.
        for label in labels:
            assert found.logprobs[label] == pytest.approx(alone.logprobs[label], abs=1.0, rel=0.05)
        top, second = sorted(alone.logprobs.values(), reverse=True)[:2]
        if top - second > 1.0:
            assert found.label == alone.label
    assert engine.classify_many([], labels) == []
    # The batch leaves no sequence behind: a later call is the fresh computation.
    engine.generate(PROMPT, max_tokens=1)
    engine.classify_many(prompts[:2], labels)
    assert engine.generate(PROMPT, max_tokens=1).stats.cached_tokens == 0


HOSTILE_LABELS = [
    ("no labels", [], InvalidParameterError),
    ("a string, not a list", " normal", InvalidParameterError),
    ("duplicates", [" a", " a"], InvalidParameterError),
    ("a label of no tokens", [" a", ""], InvalidParameterError),
    ("not strings", [" a", 3], InvalidParameterError),
    ("longer than the context", [" a", " word" * 2000], ContextOverflowError),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("case", "labels", "error"), HOSTILE_LABELS, ids=[c[0] for c in HOSTILE_LABELS]
)
def test_hostile_labels(opened, backend, case, labels, error):
    engine, reference = opened
    with pytest.raises(error):
        engine.classify(PROMPT, labels)
    assert engine.generate(PROMPT, max_tokens=8).token_ids == reference


@pytest.mark.parametrize("backend", LOGITS)
def test_choices_and_regex_give_valid_output(opened, backend):
    engine, reference = opened
    for temperature in (0.0, 1.0):
        found = engine.generate(
            PROMPT,
            max_tokens=8,
            choices=[" Paris", " London", " a city"],
            temperature=temperature,
            seed=3,
        )
        assert found.text in (" Paris", " London", " a city") and found.finish_reason == "stop"
    found = engine.generate("Reading: temp=", max_tokens=12, regex=r"[0-9]{2}\.[0-9]C")
    assert found.finish_reason == "stop"
    assert len(found.text) == 5 and found.text[2] == "." and found.text.endswith("C")
    assert engine.generate(PROMPT, max_tokens=8).token_ids == reference


@pytest.mark.parametrize("backend", LOGITS)
def test_json_schema_output_parses_and_validates(opened, backend):
    engine, reference = opened
    prompts = ["Paris as JSON:", "A city:", "{", "Describe Tokyo in JSON.", "Data:"]
    for i, prompt in enumerate(prompts * 2):
        found = engine.generate(
            prompt, max_tokens=60, json_schema=SCHEMA, temperature=0.0 if i < 5 else 0.9, seed=i
        )
        assert found.finish_reason == "stop", (found.text, found.finish_detail)
        jsonschema.validate(json.loads(found.text), SCHEMA)
    assert engine.generate(PROMPT, max_tokens=8).token_ids == reference


@pytest.mark.parametrize("backend", LOGITS)
def test_an_unfinishable_constraint_says_so(opened, backend):
    engine, reference = opened
    found = engine.generate(PROMPT, max_tokens=3, json_schema=SCHEMA)
    assert found.finish_reason == "length"
    assert "before the output satisfied the json_schema constraint" in found.finish_detail
    assert engine.generate(PROMPT, max_tokens=8).token_ids == reference


@pytest.mark.parametrize("backend", LOGITS)
def test_thousands_of_choices_and_choices_with_regex_characters(opened, backend):
    """Choices are one regular expression: 5,000 of them (a grammar of alternatives stopped
    at 2,000 mid-generation), and choices that are themselves regex syntax, taken literally."""
    engine, _ = opened
    many = [f"c{i}" for i in range(5000)]
    assert engine.generate("Pick:", choices=many, max_tokens=8).text in many
    for literal in ["x.y", "(p|q)", "a\\b", "[]{}^$", " spaced", "émoji 🎉"]:
        assert engine.generate(f"Say {literal}:", choices=[literal, "zz"], max_tokens=12).text in (
            literal,
            "zz",
        )


READING_SCHEMA = {
    "type": "object",
    "properties": {"status": {"enum": ["ok", "warning", "critical"]}, "temp": {"type": "number"}},
    "required": ["status", "temp"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("backend", LOGITS)
def test_a_small_model_finishes_ordinary_json_with_bounded_numbers(opened, backend):
    """Numbers take at most llama.cpp's 16 digits before and after the point (3 in the
    exponent): without the bound the model ran "97.5000000000..." to max_tokens in 9 of 20."""
    engine, _ = opened
    valid = 0
    for seed in range(20):
        result = engine.generate(
            "Reading: boiler 2 temperature 97.5 C, pressure nominal\nJSON:",
            json_schema=READING_SCHEMA, max_tokens=48, temperature=0.8, seed=seed,
        )  # fmt: skip
        try:
            jsonschema.validate(json.loads(result.text), READING_SCHEMA)
        except (ValueError, jsonschema.ValidationError):
            continue
        valid += 1
    assert valid >= 19


def test_number_digits_are_counted_outside_strings_only():
    from edgegemma.constraints import MAX_NUMBER_DIGITS, _NumberDigits

    digits = _NumberDigits()
    digits.feed(b'{"id": "1234567890123456789", "t": -12.')
    assert digits.part == "fraction" and not digits.full
    digits.feed(b"5" * MAX_NUMBER_DIGITS["fraction"])
    assert digits.full
    digits.feed(b"e+12")
    assert digits.part == "exponent" and not digits.full
    digits.feed(b'3, "x": "\\"99')
    assert digits.in_string and digits.part is None and not digits.full


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"regex": "(unclosed"}, "cannot be used|regex"),
        ({"json_schema": "{not json"}, "not JSON"),
        ({"json_schema": ["a list"]}, "JSON object"),
        ({"json_schema": {"type": "frobnicate"}}, "json_schema|cannot be used|schema"),
        ({"choices": []}, "non-empty list"),
        ({"choices": ["a", ""]}, "non-empty string"),
        ({"choices": ["a"], "regex": "a"}, "one constraint"),
        # No silent answers: NaN (which JSON cannot hold).
        ({"json_schema": '{"const": NaN}'}, "NaN or Infinity"),
        ({"json_schema": {"enum": [1, float("inf")]}}, "NaN or Infinity"),
        ({"choices": [f"c{i}" for i in range(20_001)]}, "at most 20000"),
        ({"logprobs": -1}, "logprobs must be"),
        ({"logprobs": 21}, "logprobs must be"),
    ],
)
def test_bad_constraints_are_specific_errors(opened, backend, kwargs, message):
    engine, reference = opened
    with pytest.raises(InvalidParameterError, match=message):
        engine.generate(PROMPT, max_tokens=4, **kwargs)
    assert engine.generate(PROMPT, max_tokens=8).token_ids == reference


@pytest.mark.parametrize("backend", LOGITS)
@pytest.mark.parametrize(
    "schema",
    [
        {"$ref": "#"},
        {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    ],
)
def test_a_constraint_no_text_satisfies_is_an_error_not_an_empty_answer(opened, backend, schema):
    """It ended "stop" with "" before: llguidance reports such a matcher as stopped."""
    engine, reference = opened
    with pytest.raises(InvalidParameterError, match="admits no further text"):
        engine.generate(PROMPT, max_tokens=4, json_schema=schema)
    assert engine.generate(PROMPT, max_tokens=8).token_ids == reference


@pytest.mark.parametrize("backend", ["mediapipe"])
def test_mediapipe_refuses_what_needs_logits(opened, backend):
    engine, _ = opened
    with pytest.raises(BackendUnavailableError, match="no logits.*constrained output"):
        engine.generate(PROMPT, max_tokens=4, choices=["a", "b"])
    with pytest.raises(BackendUnavailableError, match="no logits.*logprobs"):
        engine.generate(PROMPT, max_tokens=4, logprobs=2)


@pytest.mark.parametrize("backend", LOGITS)
def test_logprobs_are_the_chosen_tokens_and_their_alternatives(opened, backend):
    engine, reference = opened
    found = engine.generate(PROMPT, max_tokens=8, logprobs=3)
    assert found.token_ids == reference
    assert [lp.token for lp in found.logprobs] == found.token_ids
    for lp in found.logprobs:
        assert len(lp.top) == 3 and lp.top[0].logprob >= lp.top[1].logprob >= lp.top[2].logprob
        assert lp.top[0].token == lp.token  # greedy: the chosen token is the most likely
        assert lp.logprob <= 0
    assert "".join(lp.text for lp in found.logprobs) == found.text
    assert engine.generate(PROMPT, max_tokens=8).logprobs is None


def _agrees_but_for_near_ties(engine, prompt, batched, alone) -> bool:
    """Whether result ``batched`` is ``alone`` up to a token where a fresh evaluation of the
    common prefix finds the two choices within 0.5 nats of each other (batched rows round
    differently in llama.cpp's kernels: docs/design/engine.md, Batches)."""
    pairs = zip(batched.token_ids, alone.token_ids)
    first = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
    if first is None:  # equal, or one ended (end token, stop string) where the other went on
        shorter = min(batched, alone, key=lambda r: len(r.token_ids))
        return batched.token_ids == alone.token_ids or shorter.finish_reason == "stop"
    ids = (engine.tokenize(prompt) if isinstance(prompt, str) else list(prompt)) + (
        alone.token_ids[:first]
    )
    engine.reset()
    [step] = engine.generate(ids, max_tokens=1, logprobs=20).logprobs or []
    found = {t.token: t.logprob for t in step.top}
    a, b = batched.token_ids[first], alone.token_ids[first]
    return a in found and b in found and abs(found[a] - found[b]) < 0.5


def test_generate_many_runs_sequences_together_on_llamacpp(engine):
    assert engine.features.batch > 1
    prompts = [PROMPT, "Once upon a time", [2, 818, 5279], "Water boils at", "def f(x):"]
    many = engine.generate_many(prompts, max_tokens=12, stop=["\n\n"])
    alone = [engine.generate(p, max_tokens=12, stop=["\n\n"]) for p in prompts]
    for prompt, found, reference in zip(prompts, many, alone):
        assert _agrees_but_for_near_ties(engine, prompt, found, reference)
        assert found.stats.completion_tokens == len(found.token_ids) <= 12
        assert found.finish_reason in ("length", "stop")
        assert found.stats.batch_size == len(prompts) and reference.stats.batch_size == 1
    # Constraints and logprobs apply to each sequence, as to one call.
    choices = [" Paris", " London", " a city"]
    constrained = engine.generate_many(prompts[:4], choices=choices, logprobs=2)
    for found in constrained:
        assert found.text in choices and found.finish_reason == "stop"
        assert found.logprobs is not None and len(found.logprobs) == len(found.token_ids)
    # More than the context holds at once: the prompts run in several batches, in order.
    long = [engine.tokenize("word " * 200)[:200] + [i] for i in range(100, 105)]
    results = engine.generate_many(long, max_tokens=4)  # four together, then one
    assert [r.stats.prompt_tokens for r in results] == [201] * 5
    for prompt, found in zip(long, results):
        reference = engine.generate(prompt, max_tokens=4)
        assert _agrees_but_for_near_ties(engine, prompt, found, reference)
    # The batch leaves no sequence behind, and bad options fail before anything runs.
    assert engine.generate(PROMPT, max_tokens=1).stats.cached_tokens == 0
    with pytest.raises(InvalidParameterError, match="list of prompts"):
        engine.generate_many("one string", max_tokens=2)
    with pytest.raises(InvalidParameterError, match="max_tokens"):
        engine.generate_many(prompts, max_tokens=-1)
    assert isinstance(edgegemma.Classification, type)


def test_run_together_a_stream_ending_on_held_back_text_leaves_the_batch(engine):
    # The last stream stops at its limit in the middle of what could still become its stop
    # string: its held-back text goes out after its last token, and the streams before it
    # in the batch go on (this stalled the batch with "driven out of step" before).
    prompts = [PROMPT, "Once upon a time", "Water boils at", "My favourite food is"]
    short = engine.generate(prompts[3], max_tokens=3)
    stop = [short.text[-1] + "\x00"]
    streams = [engine.stream(p, max_tokens=10) for p in prompts[:3]]
    streams.append(engine.stream(prompts[3], max_tokens=3, stop=stop))
    texts = ["" for _ in streams]
    for index, piece in engine.run_together(streams):
        texts[index] += piece
    assert [s.result.stats.batch_size for s in streams] == [4] * 4
    assert texts == [s.result.text for s in streams]
    assert streams[3].result.text == short.text and streams[3].result.finish_reason == "length"
    assert all(s.result.stats.completion_tokens == 10 for s in streams[:3])


@pytest.mark.parametrize("batch_min", [None, 1])
def test_run_together_a_stream_whose_constraint_fails_ends_alone(engine, batch_min):
    """One stream's bad constraint is its own error; the others run to their own end, batched
    (batch_min=1) or one after another (the default for three)."""
    prompts = [PROMPT, "Once upon a time", "Water boils at"][: 3 if batch_min else 2]
    alone = [engine.generate(p, max_tokens=10).token_ids for p in prompts]
    streams = [engine.stream(p, max_tokens=10) for p in prompts]
    streams.insert(1, engine.stream("JSON:", max_tokens=10, json_schema={"$ref": "#"}))
    for _ in engine.run_together(streams, batch_min=batch_min):
        pass
    expected_batch = len(streams) if batch_min else 1
    assert [s.result.stats.batch_size for s in streams if s.error is None] == [
        expected_batch
    ] * len(prompts)
    assert isinstance(streams[1].error, InvalidParameterError) and streams[1].finished
    with pytest.raises(InvalidParameterError, match="admits no further text"):
        streams[1].result  # noqa: B018 (the property raises)
    assert [s.result.token_ids for s in (streams[0], *streams[2:])] == alone
    assert all(s.error is None for s in (streams[0], *streams[2:]))


def test_classify_many_keeps_the_order_around_a_prompt_scored_alone(engine):
    # A prompt too long to hold beside all its label branches is scored on its own, between
    # the batches before and after it.
    labels = [" normal", " warning sign", " critical alarm", " red alert"]
    sizes = [len(engine.tokenize(label, add_bos=False)) for label in labels]
    longest, branch_cells = max(sizes), sum(n - 1 for n in sizes if n > 1)
    assert branch_cells > longest
    long_prompt = engine.tokenize("word " * engine.n_ctx)[: engine.n_ctx - longest]
    prompts = ["Reading: temp=20C\nStatus:", long_prompt, "Reading: temp=99C\nStatus:"]
    many = engine.classify_many(prompts, labels)
    assert [m.prompt_tokens for m in many] == [
        len(engine.tokenize(prompts[0])),
        len(long_prompt),
        len(engine.tokenize(prompts[2])),
    ]
    for prompt, found in zip(prompts, many):
        engine.reset()
        alone = engine.classify(prompt, labels)
        for label in labels:
            assert found.logprobs[label] == pytest.approx(alone.logprobs[label], abs=1.0, rel=0.05)


@pytest.mark.parametrize("backend", ["onnx"])
def test_onnx_runs_prompts_of_one_length_together(opened, backend):
    engine, reference = opened
    assert engine.features.batch and engine.features.batch_same_length
    # Three prompts of one length run as one batch of the runtime; the others alone.
    prompts = [
        "The capital of France is",
        "The capital of Spain is",
        "The capital of Italy is",
        "Once upon a time",
        [2, 818, 5279],
    ]
    lengths = [len(engine.tokenize(p)) if isinstance(p, str) else len(p) for p in prompts]
    assert lengths[0] == lengths[1] == lengths[2] != lengths[3]
    many = engine.generate_many(prompts, max_tokens=12, stop=["\n\n"])
    assert [found.stats.batch_size for found in many] == [3, 3, 3, 1, 1]
    for prompt, found in zip(prompts, many):
        alone = engine.generate(prompt, max_tokens=12, stop=["\n\n"])
        assert _agrees_but_for_near_ties(engine, prompt, found, alone)
        assert found.stats.completion_tokens == len(found.token_ids) <= 12
    choices = [" Paris", " Madrid", " a city"]
    constrained = engine.generate_many(prompts[:3], choices=choices, logprobs=2)
    for found in constrained:
        assert found.text in choices and found.finish_reason == "stop"
        assert found.logprobs is not None and len(found.logprobs) == len(found.token_ids)
    # Prompts of one length are classified in one pass; labels of several tokens one prompt
    # at a time. The runtime's batched rows score as one prompt alone does.
    readings = [f"Reading: temp={t}C vib=0.{t % 10}g\nStatus:" for t in (21, 48, 77, 95, 103)]
    for labels in (LABELS, [" normal", " warning sign", " critical"]):
        for found, prompt in zip(engine.classify_many(readings, labels), readings):
            alone = engine.classify(prompt, labels)
            assert found.label == alone.label
            for label in labels:
                assert found.logprobs[label] == pytest.approx(alone.logprobs[label], abs=1e-3)
    assert engine.generate(PROMPT, max_tokens=8).token_ids == reference


@pytest.mark.parametrize("backend", ["onnx"])
def test_onnx_batched_sequences_are_driven_in_lockstep(opened, backend):
    engine, reference = opened
    sequences = engine._backend.batch(
        [[2, 818, 5279], [2, 818, 5280]], max_tokens=4, adapters=[], sampling=SamplingParams()
    )
    first = sequences[0].next_token()
    with pytest.raises(EdgeGemmaError, match="out of step"):
        sequences[0].next_token()  # before the other sequence took its token
    sequences[1].next_token()
    second = sequences[0].next_token()  # the round is evaluated now
    for sequence in sequences:
        sequence.finish()
    engine.reset()
    assert engine.generate([2, 818, 5279], max_tokens=2).token_ids == [first, second]
    assert engine.generate(PROMPT, max_tokens=8).token_ids == reference
