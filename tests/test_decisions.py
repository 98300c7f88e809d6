"""Typed decisions on the real Gemma 3 270M (llama.cpp): calibrated, shared, abstaining."""

from __future__ import annotations

import math

import numpy as np
import pytest
from backend_kits import BACKENDS

from edgegemma import Choice, Decisions, Scale, Schema, YesNo, skills
from edgegemma.decisions import calibrated, expected_calibration_error
from edgegemma.errors import InvalidParameterError

SENSOR = {"sensor": 1.0}
READINGS = ["temp=95.2C vib=0.2g batt=3.9V", "temp=81.2C vib=0.93g", "temp=41C hum=40%"]
SCHEMA = Schema(
    (
        YesNo("hot", condition="Is the temperature above 70C?"),
        Scale("severity", instruction="How severe is this reading?"),
        Choice(
            "kind",
            labels=("thermal", "mechanical", "power"),
            descriptions=("heat", "vibration", "battery"),
            instruction="Which subsystem does the reading concern?",
        ),
    ),
    template="Reading: {text}",
)


@pytest.fixture(scope="module")
def sensor_engine(engine):
    engine.load_adapter("sensor", skills.adapter_path("sensor"))
    yield engine
    engine.set_adapters(None)
    engine.unload_adapter("sensor")
    engine.reset()


def test_calibrated_probabilities_sum_to_one_and_follow_classify(sensor_engine):
    question = skills.QUESTIONS["sensor"]
    for reading in READINGS:
        found = sensor_engine.decide(reading, question, adapters=SENSOR)
        status = found["status"]
        assert math.isclose(sum(status.scores.values()), 1.0, abs_tol=1e-9)
        assert math.isclose(sum(status.raw.values()), 1.0, abs_tol=1e-9)
        assert status.confidence == max(status.scores.values())
        # The shipped question is the skill's own prompt: its raw answer is classify's.
        classified = sensor_engine.classify(
            skills.prompt("sensor", reading), skills.LABELS["sensor"], adapters=SENSOR
        )
        assert status.label == classified.label.strip() == skills.sensor_label(" " + status.label)
        # Not calibrated (an empty reading is a normal one): the answer is classify's.
        for label, p in classified.scores.items():
            assert status.raw[label.strip()] == pytest.approx(p, abs=1e-9)
            assert status.scores[label.strip()] == pytest.approx(p, abs=1e-9)


def test_content_free_calibration_divides_out_the_prior(sensor_engine):
    plain = Choice("hot", labels=("hot", "cold"), instruction="Is it hot or cold?")
    calibrated_schema = Schema((plain,), template="Reading: {text}")
    found = sensor_engine.decide("temp=50C", calibrated_schema, adapters=None)["hot"]
    assert found.scores != pytest.approx(found.raw, abs=1e-6)
    # The prior on the content-free inputs is what was divided out: undoing it gives raw.
    cf = sensor_engine.decide_many(["N/A", "", "[MASK]"], calibrated_schema, adapters=None)
    prior = np.mean([[d["hot"].raw[o] for o in ("hot", "cold")] for d in cf], axis=0)
    back = calibrated(np.array([found.raw["hot"], found.raw["cold"]]), prior, 1.0)
    assert back == pytest.approx([found.scores["hot"], found.scores["cold"]], abs=1e-9)
    uncalibrated = Schema((Choice("hot", ("hot", "cold"), calibrate=False),))
    raw_only = sensor_engine.decide("temp=50C", uncalibrated, adapters=None)["hot"]
    assert raw_only.scores == pytest.approx(raw_only.raw, abs=1e-12)


def test_a_schema_equals_its_questions_asked_one_by_one(sensor_engine):
    together = sensor_engine.decide(READINGS[0], SCHEMA, adapters=None)
    assert isinstance(together, Decisions) and set(together.answers) == {
        "hot",
        "severity",
        "kind",
    }
    for question in SCHEMA.questions:
        alone = sensor_engine.decide(
            READINGS[0], Schema((question,), template=SCHEMA.template), adapters=None
        )[question.name]
        shared = together[question.name]
        assert alone.label == shared.label
        # The schema's questions are scored in one batched pass (the input once); a batch
        # rounds differently from a single prompt, as classify_many does against classify.
        assert alone.scores == pytest.approx(shared.scores, abs=0.05)
    severity = together["severity"]
    assert severity.value is not None and 1 <= severity.value <= 5


def test_decide_many_equals_decide(sensor_engine):
    question = skills.QUESTIONS["sensor"]
    many = sensor_engine.decide_many(READINGS, question, adapters=SENSOR)
    for reading, batched in zip(READINGS, many):
        one = sensor_engine.decide(reading, question, adapters=SENSOR)
        assert batched["status"].label == one["status"].label
        assert batched["status"].scores == pytest.approx(one["status"].scores, abs=5e-3)


def test_abstains_under_the_threshold_and_yes_no_follows_its_threshold(sensor_engine):
    strict = Schema(
        (Choice("status", skills.sensor.LABELS, prompt="\nStatus:", min_confidence=1.0),),
        template=skills.QUESTIONS["sensor"].template,
    )
    found = sensor_engine.decide(READINGS[1], strict, adapters=SENSOR)["status"]
    assert found.abstained and found.label is None and found.confidence < 1.0
    for threshold in (0.0, 1.0):
        question = YesNo("hot", condition="Is it hot?", threshold=threshold)
        answer = sensor_engine.decide("temp=50C", question, adapters=None)["hot"]
        assert answer.label == ("yes" if threshold == 0.0 else "no")


def test_prewarm_then_decide_gives_the_same_answer(sensor_engine):
    question = skills.QUESTIONS["sensor"]
    sensor_engine.prewarm(question, adapters=SENSOR)
    first = sensor_engine.decide(READINGS[2], question, adapters=SENSOR)
    again = sensor_engine.decide(READINGS[2], question, adapters=SENSOR)
    assert first["status"].scores == pytest.approx(again["status"].scores, abs=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decide_on_every_backend(engines, backend):
    engine, _ = engines(backend)
    small = Schema(
        (YesNo("hot", condition="Is it hot?"), Choice("kind", ("heat", "cold"))),
        template="Reading: {text}",
    )
    many = engine.decide_many(["temp=95C", "temp=-20C"], small, adapters=None)
    one = engine.decide("temp=95C", small, adapters=None)
    for name in ("hot", "kind"):
        assert math.isclose(sum(one[name].scores.values()), 1.0, abs_tol=1e-9)
        assert many[0][name].scores == pytest.approx(one[name].scores, abs=0.02)
        assert one[name].scores != pytest.approx(one[name].raw, abs=1e-6)  # calibrated


@pytest.mark.parametrize(
    "questions",
    [
        [],
        "status?",
        [Choice("a", labels=("only",))],
        [Choice("a", labels=("x", "x"))],
        [Choice("a", labels=("x", "y"), descriptions=("one",))],
        [Choice("", labels=("x", "y"))],
        [Choice("a", ("x", "y")), Choice("a", ("p", "q"))],
        [YesNo("a")],
        [YesNo("a", condition="ok?", threshold=1.5)],
        [Scale("a", low=5, high=1)],
        [Choice("a", ("x", "y"), temperature=0.0)],
        [Choice("a", ("x", "y"), min_confidence=-0.1)],
        Schema((Choice("a", ("x", "y")),), template="no placeholder"),
        Schema((Choice("a", ("x", "y")),), content_free=()),
    ],
)
def test_bad_questions_are_invalid_parameters(engine, questions):
    with pytest.raises(InvalidParameterError):
        engine.decide("temp=50C", questions)


def test_expected_calibration_error():
    assert expected_calibration_error([1.0, 1.0], [True, True]) == 0.0
    assert expected_calibration_error([0.9, 0.9], [False, False]) == pytest.approx(0.9)
    assert expected_calibration_error([0.75] * 4, [True, True, True, False]) == pytest.approx(0)
    with pytest.raises(InvalidParameterError):
        expected_calibration_error([], [])
