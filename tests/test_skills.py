"""The shipped skills: their data follow their definitions, and their adapters do the task.

Accuracies are measured on the held-out test split with greedy decoding on the real Gemma 3
270M GGUF; thresholds sit a little below the measured values (see each test) so that a
broken adapter, prompt builder or conversion fails while run-to-run noise does not. Greedy
decoding on one machine is deterministic, so the margin covers other CPUs' float rounding.
"""

from __future__ import annotations

import pytest

from edgegemma import skills
from edgegemma.adapters.gguf import check_lora
from edgegemma.errors import InvalidParameterError
from edgegemma.skills import emoji, sensor


@pytest.fixture(scope="module")
def skill_engine(engine):
    """The shared llama.cpp engine with both skill adapters loaded."""
    for skill in skills.SKILLS:
        engine.load_adapter(skill, skills.adapter_path(skill))
    yield engine
    engine.set_adapters(None)
    for skill in skills.SKILLS:
        engine.unload_adapter(skill)
    engine.reset()


# -- data -------------------------------------------------------------------------------


def test_sensor_data_follow_the_rule_and_test_readings_are_unseen():
    train, test = skills.examples("sensor", "train"), skills.examples("sensor", "test")
    for example in train + test:
        assert example.prompt == skills.prompt("sensor", example.input)
        assert example.completion == " " + sensor.label(example.input)
    assert not {e.input for e in test} & {e.input for e in train}
    labels = [skills.sensor_label(e.completion) for e in test]
    assert {label: labels.count(label) for label in sensor.LABELS} == {
        "normal": 100,
        "warning": 100,
        "critical": 100,
    }


def test_the_rule_reads_fields_in_any_order_and_format():
    assert sensor.label("temp=90C") == "critical"
    assert (
        sensor.label("temp=89.99C") == "warning" and sensor.label("hum=40% temp=74.9C") == "normal"
    )
    assert sensor.label("temp=-5C batt=3.9V") == "normal"
    assert sensor.label("vib=1.5g") == "critical" and sensor.label("vib=.8g") == "warning"
    assert sensor.label("batt=3.3V") == "normal" and sensor.label("batt=3.29V") == "critical"
    assert (
        sensor.label("fan=off temp=60C") == "warning"
        and sensor.label("temp=60C; fan=on") == "normal"
    )
    assert sensor.label("fan=off") == "normal" and sensor.label("") == "normal"
    assert sensor.label("rpm=9000, hum=85%") == "warning"


def test_sensor_answers_are_normalised():
    assert skills.sensor_label(" Critical\n") == "critical"
    assert skills.sensor_label(" warning.") == "warning"
    assert skills.sensor_label(" it is fine") == ""


def test_emoji_data_and_metric():
    train, test = skills.examples("emoji", "train"), skills.examples("emoji", "test")
    assert len(test) == 120 and len(train) == 600
    assert not {e.input for e in test} & {e.input for e in train}
    for example in train + test:
        assert example.prompt == skills.prompt("emoji", example.input)
        assert emoji.score(example.completion, example.accepted)
    accepted = frozenset({"🎂", "🎉", "🥳"})
    assert emoji.score(" 🎉🥳", accepted) and emoji.score("🎈 🎉", accepted)
    assert emoji.score(" 🎉️", accepted)  # a variation selector changes nothing
    assert not emoji.score(" 🍕", accepted)  # wrong emoji
    assert not emoji.score(" 🎉 party", accepted)  # text is not an answer
    assert not emoji.score(" 🎉🎉🎉🎉", accepted)  # more than three
    assert not emoji.score("", accepted)
    assert emoji.units("👩‍💻🇮🇹👍🏽") == ["👩\u200d💻", "🇮🇹", "👍🏽"]
    assert emoji.jaccard(" 🎂🎉", " 🎂") == 0.5


def test_adapter_files_ship_and_fit_the_base_model(base_header):
    for skill in skills.SKILLS:
        info = check_lora(skills.adapter_path(skill), base_header)
        assert info.rank == 8 and len(info.targets) == 72  # q, k, v, o of 18 blocks
        assert skills.adapter_path(skill).stat().st_size < 2_000_000
    with pytest.raises(InvalidParameterError, match="unknown skill"):
        skills.adapter_path("weather")
    with pytest.raises(InvalidParameterError, match="unknown backend"):
        skills.adapter_path("sensor", backend="tensorrt")


# -- accuracy on llama.cpp ----------------------------------------------------------------


def test_sensor_adapter_accuracy(skill_engine):
    # Every other held-out reading (50 per label) keeps the suite short; docs/performance.md's
    # figure is the whole split's.
    result = skills.evaluate(skill_engine, "sensor", adapter="sensor", limit=150)
    # Measured: 94.7% (142/150; 287-288 of all 300); the target is 90%. 92% leaves room
    # for another CPU's float rounding, not for a broken adapter.
    assert result.accuracy >= 0.92, result


def test_emoji_adapter_score(skill_engine):
    result = skills.evaluate(skill_engine, "emoji", adapter="emoji")
    # Measured: mean overlap with the target answer 0.71; hit rate 91/120 = 75.8% (1-3 emoji
    # including an accepted one).
    assert result.jaccard >= 0.65, result
    assert result.accuracy >= 0.70, result


def test_base_model_few_shot_is_far_below_the_adapters(skill_engine):
    # The baseline on an evenly spread subset (the few-shot prompts are ~6x longer); the
    # full-split numbers are in docs/performance.md.
    sensor_base = skills.evaluate(skill_engine, "sensor", adapter=None, limit=30)
    emoji_base = skills.evaluate(skill_engine, "emoji", adapter=None, limit=40)
    # Measured: sensor 10/30 = 33% (the base model answers "critical" to everything: chance),
    # emoji overlap 0.39 (0.38 on the whole split; hit rate 24/40, 62.5% on the whole split). Ceilings: far below
    # the adapters' 96% and 0.71.
    assert sensor_base.accuracy <= 0.45, sensor_base
    assert emoji_base.jaccard <= 0.48, emoji_base


# -- the other backends ---------------------------------------------------------------------
# Their models are built from the same GGUF (cached by tests/test_onnx.py and
# tests/test_mediapipe.py earlier in the session); the adapters are converted from the
# shipped PEFT folders on first use. Subsets keep these tests to about a minute each.


@pytest.fixture(scope="module")
def onnx_engine(gguf_path):
    import edgegemma
    from edgegemma.convert.onnx import build_onnx
    from edgegemma.recipes import onnx_options as build_options

    build_onnx(gguf_path, build_options())  # from the cache when tests/test_onnx.py built it
    with edgegemma.load(gguf_path, backend="onnx", n_ctx=1024, n_threads=2) as shared:
        for skill in skills.SKILLS:
            shared.load_adapter(skill, skills.adapter_path(skill, "onnx", model=str(gguf_path)))
        yield shared


@pytest.fixture(scope="module")
def litert_engine(gguf_path):
    import edgegemma
    from edgegemma.convert.litert import build_litert
    from edgegemma.recipes import litert_options as build_options

    build_litert(gguf_path, build_options(lora_rank=16))  # cached by tests/test_mediapipe.py
    with edgegemma.load(gguf_path, backend="mediapipe", n_ctx=1024, n_threads=2) as shared:
        for skill in skills.SKILLS:
            shared.load_adapter(
                skill, skills.adapter_path(skill, "mediapipe", model=str(gguf_path))
            )
        yield shared


def test_skills_on_onnx_runtime(onnx_engine):
    sensor_result = skills.evaluate(onnx_engine, "sensor", adapter="sensor", limit=100)
    emoji_result = skills.evaluate(onnx_engine, "emoji", adapter="emoji", limit=60)
    # Measured on the int4 build: sensor 96/100 (284/300 = 94.7% on the whole split), emoji
    # 43/60 = 71.7% (86/120 on the whole split). The int4 base differs from Q4_K_M, hence
    # thresholds a little below llama.cpp's.
    assert sensor_result.accuracy >= 0.90, sensor_result
    assert emoji_result.accuracy >= 0.62, emoji_result


def test_skills_on_litert_lm(litert_engine):
    sensor_result = skills.evaluate(litert_engine, "sensor", adapter="sensor", limit=60)
    emoji_result = skills.evaluate(litert_engine, "emoji", adapter="emoji", limit=30)
    # Measured on the default (dynamic int8) LoRA build: sensor 56/60 = 93.3% (288/300 = 96.0%
    # on the whole split), emoji 23/30 = 76.7% (90/120); the same subset scores on the
    # weight-only int8 build. Each call opens a LiteRT-LM session (~0.4 s per example here),
    # hence the smaller subsets and wider margins.
    assert sensor_result.accuracy >= 0.85, sensor_result
    assert emoji_result.accuracy >= 0.63, emoji_result


def test_switching_skills_per_call_keeps_each_answer(skill_engine):
    reading, phrase = "temp=95.1C vib=0.3g batt=3.9V", "pizza night with friends"
    alone = [
        skill_engine.generate(
            skills.prompt("sensor", reading),
            adapters={"sensor": 1.0},
            **skills.GENERATION["sensor"],
        ).text,
        skill_engine.generate(
            skills.prompt("emoji", phrase), adapters={"emoji": 1.0}, **skills.GENERATION["emoji"]
        ).text,
    ]
    for _ in range(2):
        assert (
            skill_engine.generate(
                skills.prompt("emoji", phrase),
                adapters={"emoji": 1.0},
                **skills.GENERATION["emoji"],
            ).text
            == alone[1]
        )
        assert (
            skill_engine.generate(
                skills.prompt("sensor", reading),
                adapters={"sensor": 1.0},
                **skills.GENERATION["sensor"],
            ).text
            == alone[0]
        )
    assert skills.sensor_label(alone[0]) == "critical"
