"""Skills that ship with edgegemma: small LoRA adapters that teach the base model one task.

    import edgegemma
    from edgegemma import skills

    with edgegemma.load("gemma3-270m") as engine:
        engine.load_adapter("sensor", skills.adapter_path("sensor"))
        out = engine.generate(skills.prompt("sensor", "temp=81.2C vib=0.93g batt=3.71V"),
                              adapters={"sensor": 1.0}, **skills.GENERATION["sensor"])
        print(skills.sensor_label(out.text))  # "warning"

Each skill has a prompt builder (the exact format its adapter was trained on -- apps, the
tests and the benchmarks all build prompts here), a train and a held-out test split, its
trained PEFT adapter and the llama.cpp adapter converted from it; :func:`adapter_path` makes
the other backends' files from the PEFT adapter on first use.
``python -m edgegemma.skills.build`` rebuilds all of it.

- **sensor**: an IoT gateway reading -> ``normal`` / ``warning`` / ``critical``
  (:mod:`edgegemma.skills.sensor` states the rule); metric: accuracy.
- **emoji**: a short phrase -> 1-3 emoji; metric: mean overlap (Jaccard) with the reference
  answer, with the hit rate (an accepted emoji among 1-3) beside it
  (:mod:`edgegemma.skills.emoji` explains why).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..decisions import Choice, Schema
from ..errors import InvalidParameterError
from ..jsonl import parse_lines
from . import emoji, sensor

if TYPE_CHECKING:
    from ..engine import Engine

DATA = Path(__file__).parent / "data"
FEW_SHOT = 6
"""Examples in the base model's few-shot baseline prompt (two per label for sensor)."""


@dataclass(frozen=True)
class Example:
    input: str
    """The reading or phrase, before the prompt is built around it."""
    prompt: str
    completion: str
    """What the adapter is trained to answer (with its leading space)."""
    accepted: frozenset[str] = frozenset()
    """emoji only: every emoji that counts as a correct answer."""


@dataclass(frozen=True)
class Skill:
    """One shipped skill: how its prompts are built and its answers scored."""

    name: str
    prompt: Callable[[str], str]
    """The prompt for an input in the format the adapter was trained on."""
    generation: dict[str, Any]
    """``generate`` settings the skill is evaluated with: greedy, short, one line."""
    is_correct: Callable[[str, Example], bool]
    """Whether an answer is right (sensor: the label; emoji: an accepted emoji, the hit)."""
    overlap: Callable[[str, Example], float] | None = None
    """A graded score per answer where the skill has one (emoji: Jaccard with the reference)."""
    labels: tuple[str, ...] = ()
    """The closed set of answers of a classification skill; few-shot prompts take turns."""


SKILLS: dict[str, Skill] = {
    "sensor": Skill(
        name="sensor",
        prompt=sensor.prompt,
        generation={"max_tokens": 4, "temperature": 0.0, "stop": ["\n"]},
        is_correct=lambda answer, example: (
            sensor.normalise(answer) == sensor.normalise(example.completion)
        ),
        labels=sensor.LABELS,
    ),
    "emoji": Skill(
        name="emoji",
        prompt=emoji.prompt,
        generation={"max_tokens": 16, "temperature": 0.0, "stop": ["\n"]},
        is_correct=lambda answer, example: emoji.score(answer, example.accepted),
        overlap=lambda answer, example: emoji.jaccard(answer, example.completion),
    ),
}
"""The shipped skills by name."""
GENERATION: dict[str, dict[str, Any]] = {name: skill.generation for name, skill in SKILLS.items()}
"""``generate`` settings of each skill, by name."""
LABELS: dict[str, list[str]] = {
    name: [f" {label}" for label in skill.labels] for name, skill in SKILLS.items() if skill.labels
}
"""The labels of each classification skill as ``Engine.classify`` takes them (with the leading
space the answer has after the prompt)."""
QUESTIONS: dict[str, Schema] = {
    "sensor": Schema(
        # Not calibrated against content-free inputs: an empty reading is a normal one by the
        # skill's rule, so that "prior" is an answer, not a bias (docs/performance.md).
        (Choice("status", labels=sensor.LABELS, prompt="\nStatus:", calibrate=False),),
        template=sensor.prompt("{text}").removesuffix("\nStatus:"),
    ),
}
"""The question each classification skill answers, for :meth:`~edgegemma.Engine.decide`: the
skill's own prompt cut into the input's template and the question's text, so that the adapter
sees the format it was trained on."""

sensor_label = sensor.normalise


@dataclass(frozen=True)
class Evaluation:
    skill: str
    backend: str
    adapter: str | None
    """The adapter name used, or None for the base model (few-shot)."""
    total: int
    correct: int
    jaccard: float | None
    """emoji only: mean overlap with the target answers, the skill's headline score."""
    seconds_per_example: float
    answers: tuple[str, ...]

    @property
    def accuracy(self) -> float:
        return self.correct / self.total


def prompt(skill: str, text: str) -> str:
    """The prompt for ``text`` in ``skill``'s trained format."""
    return _skill(skill).prompt(text)


def adapter_path(skill: str, backend: str = "llamacpp", *, model: str = "gemma3-270m") -> Path:
    """The adapter file of ``skill`` for ``backend`` (llamacpp, onnx or mediapipe).

    The llama.cpp adapter ships with edgegemma. The other formats are converted from the
    shipped PEFT folder on first use (numpy only, about a second) and cached under
    ``$EDGEGEMMA_HOME/builds``; the ONNX one names the inputs of the ONNX build of
    ``model``, which must exist (``edgegemma convert gemma3-270m --to onnx``).
    """
    from ..adapters import FORMATS, convert, format_for_backend
    from ..builds import cached_build
    from ..files import sha256_file

    if backend not in {f.backend for f in FORMATS.values()}:
        backends = ", ".join(f.backend for f in FORMATS.values())
        raise InvalidParameterError(f"unknown backend {backend!r}; choose one of {backends}")
    fmt = format_for_backend(backend)
    name = f"adapter{fmt.suffix}"
    shipped = DATA / _skill(skill).name / name
    if shipped.is_file():
        return shipped
    source = peft_dir(skill)
    key = {
        "skill": skill,
        "peft_sha256": sha256_file(source / "adapter_model.safetensors"),
        "config_sha256": sha256_file(source / "adapter_config.json"),
        "model": model,
    }

    def build(out: Path) -> None:
        convert(source, fmt.name, out / name, model=model)

    return cached_build(f"skill-{backend}", key, build) / name


def peft_dir(skill: str) -> Path:
    """The shipped PEFT folder of ``skill``, which every backend's adapter is converted from."""
    return DATA / _skill(skill).name / "peft"


def examples(skill: str, split: str) -> list[Example]:
    """The ``"train"`` or ``"test"`` examples of ``skill``."""
    if split not in ("train", "test"):
        raise InvalidParameterError(f"split must be 'train' or 'test', got {split!r}")
    path = DATA / _skill(skill).name / f"{split}.jsonl"
    found = []
    for _, record in parse_lines(path.read_text(encoding="utf-8"), str(path)):
        found.append(
            Example(
                input=record["input"],
                prompt=record["prompt"],
                completion=record["completion"],
                accepted=frozenset(emoji.units(record.get("accepted", "")) or ()),
            )
        )
    return found


def is_correct(skill: str, answer: str, example: Example) -> bool:
    """Whether ``answer`` is right: the label for sensor, an accepted emoji (hit) for emoji."""
    return _skill(skill).is_correct(answer, example)


def few_shot_prompt(skill: str, text: str, shots: Sequence[Example] | None = None) -> str:
    """``text``'s prompt preceded by solved training examples: the base model's baseline."""
    if shots is None:
        shots = few_shot_examples(skill)
    solved = "".join(f"{shot.prompt}{shot.completion}\n\n" for shot in shots)
    return solved + prompt(skill, text)


def few_shot_examples(skill: str, count: int = FEW_SHOT) -> list[Example]:
    """Solved training examples for the baseline: labels in turn, or distinct answers (emoji)."""
    train = examples(skill, "train")
    labels = _skill(skill).labels
    if labels:
        by_label = {
            label: [e for e in train if e.completion.strip().lower() == label] for label in labels
        }
        return [by_label[label][i] for i in range(count) for label in labels][:count]
    chosen: list[Example] = []
    for example in train:
        if all(example.completion != c.completion for c in chosen):
            chosen.append(example)
    return chosen[:count]


def evaluate(
    engine: Engine,
    skill: str,
    *,
    adapter: str | None,
    split: str = "test",
    limit: int | None = None,
    classify: bool = False,
) -> Evaluation:
    """Run ``skill``'s examples through ``engine`` and score the answers.

    With ``adapter`` (the name of an adapter loaded into the engine) the prompts are the
    skill's own; with ``adapter=None`` the base model gets the few-shot prompt instead.
    ``limit`` takes an evenly spread subset of that many examples. ``classify=True`` (skills
    with labels) asks :meth:`~edgegemma.Engine.classify` instead of generating the answer.
    """
    if classify and skill not in LABELS:
        raise InvalidParameterError(f"the {skill} skill has no labels to classify into")
    chosen = examples(skill, split)
    if limit is not None and limit < len(chosen):
        chosen = [chosen[i * len(chosen) // limit] for i in range(limit)]
    record = _skill(skill)
    shots = few_shot_examples(skill) if adapter is None else None
    adapters = {adapter: 1.0} if adapter is not None else None
    answers, correct, overlap = [], 0, 0.0
    started = time.perf_counter()
    for example in chosen:
        text = (
            example.prompt if adapter is not None else few_shot_prompt(skill, example.input, shots)
        )
        if classify:
            answer = engine.classify(text, LABELS[skill], adapters=adapters).label
        else:
            answer = engine.generate(text, adapters=adapters, **record.generation).text
        answers.append(answer)
        correct += record.is_correct(answer, example)
        overlap += record.overlap(answer, example) if record.overlap is not None else 0.0
    elapsed = time.perf_counter() - started
    return Evaluation(
        skill=skill,
        backend=engine.backend_name,
        adapter=adapter,
        total=len(chosen),
        correct=correct,
        jaccard=overlap / len(chosen) if record.overlap is not None else None,
        seconds_per_example=elapsed / len(chosen),
        answers=tuple(answers),
    )


def _skill(name: str) -> Skill:
    if name not in SKILLS:
        raise InvalidParameterError(f"unknown skill {name!r}; shipped skills: {', '.join(SKILLS)}")
    return SKILLS[name]
