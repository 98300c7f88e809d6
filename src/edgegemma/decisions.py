"""Typed decisions read from the model's likelihoods: choices, yes/no conditions and scales.

A :class:`Schema` holds a prompt template for the input and its questions. Each question is a
branch of the input: the input's text, the question's, then each of its options scored the
way :meth:`Engine.classify` scores labels (the options' tokens after one prefill), with no
generation. Where the backend batches (llama.cpp), one input's questions are scored in one
pass: the input's tokens once, each question's text a sequence branching from them.

An option's raw probability is its likelihood normalised over the question's options. A model
has a prior over the options that does not depend on the input (it favours a word it has seen
more often); contextual calibration (Zhao et al., 2021, "Calibrate before use") measures that
prior on content-free inputs (``"N/A"``, ``""``, ``"[MASK]"``) put through the same template and
divides it out. A temperature then sharpens or flattens the result, and a question abstains
(``label=None``) when its confidence, the probability of its answer, is under
``min_confidence``. Calibration helps where the content-free inputs carry no answer; for a
skill whose empty input has a right answer (an empty sensor reading is a normal one) it
removes signal, so such a question turns it off (``calibrate=False``).
"""

from __future__ import annotations

import math
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeAlias

import numpy as np

from .errors import InvalidParameterError
from .options import ENGINE_ADAPTERS
from .results import Classification

CONTENT_FREE = ("N/A", "", "[MASK]")
"""The inputs whose answers measure a question's prior (contextual calibration)."""


@dataclass(frozen=True)
class _Question(ABC):
    name: str
    """The key of this question's answer in :class:`Decisions`."""

    @abstractmethod
    def options(self) -> tuple[str, ...]:
        """What the answer may be, as the text that would follow :meth:`ask`."""

    @abstractmethod
    def ask(self) -> str:
        """The text after the input that the options follow."""


@dataclass(frozen=True)
class Choice(_Question):
    """One of ``labels``: ``Choice("status", ("normal", "warning", "critical"))``.

    ``descriptions`` (one per label) and ``instruction`` are written into the question's text;
    ``prompt`` replaces that text entirely (a fine-tuned skill's own format, such as the sensor
    skill's ``"\\nStatus:"``). Each label is scored with a space before it, as it would follow
    ``"...Answer:"``.
    """

    labels: tuple[str, ...] = ()
    descriptions: tuple[str, ...] | None = None
    instruction: str = ""
    prompt: str | None = None
    temperature: float = 1.0
    min_confidence: float = 0.0
    calibrate: bool = True

    def options(self) -> tuple[str, ...]:
        return tuple(self.labels)

    def ask(self) -> str:
        if self.prompt is not None:
            return self.prompt
        if self.descriptions is not None:
            listed = "; ".join(f"{a} ({d})" for a, d in zip(self.labels, self.descriptions))
        else:
            listed = ", ".join(self.labels)
        instruction = f"{self.instruction}\n" if self.instruction else ""
        return f"\n{instruction}Options: {listed}\nAnswer:"


@dataclass(frozen=True)
class YesNo(_Question):
    """Whether ``condition`` holds: ``"yes"`` when its calibrated probability is at least
    ``threshold``, else ``"no"``."""

    condition: str = ""
    threshold: float = 0.5
    prompt: str | None = None
    temperature: float = 1.0
    min_confidence: float = 0.0
    calibrate: bool = True

    def options(self) -> tuple[str, ...]:
        return ("yes", "no")

    def ask(self) -> str:
        if self.prompt is not None:
            return self.prompt
        return f"\nQuestion: {self.condition} Answer yes or no.\nAnswer:"


@dataclass(frozen=True)
class Scale(_Question):
    """A score from ``low`` to ``high`` (integers); the answer's ``value`` is the expected
    score under the calibrated probabilities, ``label`` the likeliest one."""

    instruction: str = ""
    low: int = 1
    high: int = 5
    prompt: str | None = None
    temperature: float = 1.0
    min_confidence: float = 0.0
    calibrate: bool = True

    def options(self) -> tuple[str, ...]:
        return tuple(str(n) for n in range(self.low, self.high + 1))

    def ask(self) -> str:
        if self.prompt is not None:
            return self.prompt
        return f"\n{self.instruction}\nScore from {self.low} to {self.high}.\nAnswer:"


Question: TypeAlias = Choice | YesNo | Scale


@dataclass(frozen=True)
class Schema:
    """Questions answered together from one evaluation of the input.

    ``template`` places the input in the prompt (``"{text}"`` by default); the text before
    ``{text}`` is the static prefix :meth:`Engine.prewarm` evaluates ahead of time.
    """

    questions: tuple[Question, ...]
    template: str = "{text}"
    content_free: tuple[str, ...] = CONTENT_FREE

    def prompt(self, text: str) -> str:
        return self.template.replace("{text}", text)

    @property
    def prefix(self) -> str:
        return self.template.split("{text}", 1)[0]


Questions: TypeAlias = Schema | Question | Sequence[Question]


@dataclass(frozen=True)
class Decision:
    """One question's answer."""

    label: str | None
    """The answer, or None when the question abstained."""
    scores: dict[str, float]
    """Calibrated probabilities of the options (they sum to 1)."""
    confidence: float
    """The calibrated probability of the answer (of the likeliest option when abstaining)."""
    abstained: bool
    raw: dict[str, float]
    """The options' likelihoods normalised over the options, before calibration."""
    value: float | None = None
    """Scale questions: the expected score under ``scores``."""


@dataclass(frozen=True)
class Decisions:
    """What :meth:`Engine.decide` returns: each question's :class:`Decision` by name."""

    answers: dict[str, Decision]
    prompt_tokens: int
    seconds: float
    adapters: dict[str, float] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Decision:
        return self.answers[name]


def schema_of(questions: object) -> Schema:
    """``questions`` as a checked :class:`Schema` (a question or a list of them is one with
    the default template); a malformed one raises InvalidParameterError."""
    if isinstance(questions, Schema):
        schema = questions
    elif isinstance(questions, (Choice, YesNo, Scale)):
        schema = Schema((questions,))
    elif isinstance(questions, Sequence) and not isinstance(questions, (str, bytes)):
        schema = Schema(tuple(questions))
    else:
        raise InvalidParameterError(
            f"questions must be a Schema, a Choice, YesNo or Scale, or a list of them, "
            f"got {questions!r}"
        )
    _check_schema(schema)
    return schema


def _check_schema(schema: Schema) -> None:
    if not isinstance(schema.template, str) or schema.template.count("{text}") != 1:
        raise InvalidParameterError(
            f"a schema's template must contain {{text}} once, got {schema.template!r}"
        )
    if not schema.questions:
        raise InvalidParameterError("a schema needs at least one question")
    if not schema.content_free or not all(isinstance(c, str) for c in schema.content_free):
        raise InvalidParameterError("content_free must be a non-empty tuple of strings")
    names = [getattr(q, "name", None) for q in schema.questions]
    for question in schema.questions:
        _check_question(question)
    if len(set(names)) != len(names):
        raise InvalidParameterError(f"question names must be distinct, got {names!r}")


def _check_question(question: object) -> None:
    if not isinstance(question, (Choice, YesNo, Scale)):
        raise InvalidParameterError(f"not a question (Choice, YesNo or Scale): {question!r}")
    if not isinstance(question.name, str) or not question.name:
        raise InvalidParameterError(f"a question's name must be a non-empty string: {question!r}")
    where = f"question {question.name!r}"
    if isinstance(question, Choice):
        labels = question.labels
        if isinstance(labels, str) or len(labels) < 2:
            raise InvalidParameterError(f"{where} needs at least two labels, got {labels!r}")
        if not all(isinstance(x, str) and x.strip() for x in labels):
            raise InvalidParameterError(f"{where}: every label must be a non-blank string")
        if len(set(labels)) != len(labels):
            raise InvalidParameterError(f"{where}: labels must be distinct, got {labels!r}")
        if question.descriptions is not None and len(question.descriptions) != len(labels):
            raise InvalidParameterError(f"{where}: one description per label")
    elif isinstance(question, YesNo):
        if not question.condition and question.prompt is None:
            raise InvalidParameterError(f"{where} needs a condition")
        if not _probability(question.threshold):
            raise InvalidParameterError(
                f"{where}: threshold must be in [0, 1], got {question.threshold!r}"
            )
    elif (
        not (isinstance(question.low, int) and isinstance(question.high, int))
        or not 0 <= question.low < question.high <= 100
    ):
        raise InvalidParameterError(
            f"{where}: low and high must be integers with 0 <= low < high <= 100"
        )
    temperature = question.temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise InvalidParameterError(f"{where}: temperature must be a number")
    if not (math.isfinite(temperature) and temperature > 0):
        raise InvalidParameterError(f"{where}: temperature must be positive, got {temperature}")
    if not _probability(question.min_confidence):
        raise InvalidParameterError(
            f"{where}: min_confidence must be in [0, 1], got {question.min_confidence!r}"
        )


def _probability(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 <= value <= 1


# -- the math ------------------------------------------------------------------------------


def _option_labels(question: Question) -> list[str]:
    """The options as scored after the question's text (a space first, as after "Answer:")."""
    return [f" {option}" for option in question.options()]


def calibrated(raw: np.ndarray, prior: np.ndarray | None, temperature: float) -> np.ndarray:
    """``raw`` with ``prior`` divided out (contextual calibration) and ``temperature`` applied,
    normalised to sum to 1."""
    logs = np.log(np.clip(raw, 1e-300, None))
    if prior is not None:
        logs = logs - np.log(np.clip(prior, 1e-300, None))
    logs = logs / temperature
    found = np.exp(logs - logs.max())
    return np.asarray(found / found.sum())


def answer(question: Question, raw: np.ndarray, prior: np.ndarray | None) -> Decision:
    """The question's :class:`Decision` from its raw probabilities and its prior."""
    options = question.options()
    probs = calibrated(raw, prior if question.calibrate else None, question.temperature)
    best = int(probs.argmax())
    if isinstance(question, YesNo):
        best = 0 if probs[0] >= question.threshold else 1
    confidence = float(probs[best])
    abstained = confidence < question.min_confidence
    value = None
    if isinstance(question, Scale):
        value = float(sum(int(o) * p for o, p in zip(options, probs)))
    return Decision(
        label=None if abstained else options[best],
        scores={o: float(p) for o, p in zip(options, probs)},
        confidence=confidence,
        abstained=abstained,
        raw={o: float(p) for o, p in zip(options, raw)},
        value=value,
    )


def expected_calibration_error(
    confidences: Sequence[float], correct: Sequence[bool], bins: int = 10
) -> float:
    """The expected calibration error: the gap between confidence and accuracy, averaged
    over equal-width confidence bins weighted by how many answers fall in each."""
    conf = np.asarray(confidences, dtype=np.float64)
    hits = np.asarray(correct, dtype=np.float64)
    if len(conf) == 0:
        raise InvalidParameterError("expected_calibration_error needs at least one answer")
    which = np.minimum((conf * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            total += mask.sum() / len(conf) * abs(conf[mask].mean() - hits[mask].mean())
    return float(total)


# -- with an engine -------------------------------------------------------------------------


class Engine(Protocol):
    """What decisions use of :class:`edgegemma.Engine` (a protocol, so that this module, which
    the engine imports, does not import it back)."""

    @property
    def adapters(self) -> dict[str, Path]: ...

    @property
    def active_adapters(self) -> dict[str, float]: ...

    def classify(
        self, prompt: str, labels: Sequence[str], *, adapters: Mapping[str, float] | None
    ) -> Classification: ...

    def classify_many(
        self, prompts: Sequence[str], labels: Sequence[str], *, adapters: Mapping[str, float] | None
    ) -> list[Classification]: ...


_PRIORS: weakref.WeakKeyDictionary[Engine, dict[tuple[object, ...], np.ndarray]] = (
    weakref.WeakKeyDictionary()
)
"""Each engine's measured priors, by schema template, question and adapter set."""


def decide_many(
    engine: Engine, texts: Sequence[str], questions: object, adapters: object
) -> list[Decisions]:
    """Each text's :class:`Decisions` (see :meth:`Engine.decide_many`)."""
    schema = schema_of(questions)
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise InvalidParameterError("texts must be a list of strings")
    active = engine.active_adapters if adapters is ENGINE_ADAPTERS else _adapters(adapters)
    priors = _priors(engine, schema, active)
    started = time.perf_counter()
    raws = _raw(engine, schema, [schema.prompt(t) for t in texts], active)
    share = (time.perf_counter() - started) / max(len(texts), 1)
    return [
        Decisions(
            answers={q.name: answer(q, raw[q.name], priors[q.name]) for q in schema.questions},
            prompt_tokens=tokens,
            seconds=share,
            adapters=dict(active),
        )
        for raw, tokens in raws
    ]


def prewarm(engine: Engine, questions: object, adapters: object) -> None:
    """Measure the schema's priors and evaluate its static prefix (see
    :meth:`Engine.prewarm`)."""
    schema = schema_of(questions)
    active = engine.active_adapters if adapters is ENGINE_ADAPTERS else _adapters(adapters)
    _priors(engine, schema, active)
    # Evaluating the prefix last leaves it in the engine's prefix cache for the next call.
    if schema.prefix:
        first = schema.questions[0]
        engine.classify(schema.prefix, _option_labels(first), adapters=active)


def _adapters(adapters: object) -> dict[str, float]:
    if adapters is None:
        return {}
    if not isinstance(adapters, Mapping):
        raise InvalidParameterError(
            f"adapters must be a mapping of name to scale, got {adapters!r}"
        )
    return dict(adapters)


def _raw(
    engine: Engine, schema: Schema, prompts: list[str], active: dict[str, float]
) -> list[tuple[dict[str, np.ndarray], int]]:
    """Each prompt's raw probabilities by question, and its prompt's tokens.

    Each question is a branch of its input: the input's text, the question's, then the options
    scored after it. One input's questions go to the model together, as one classify_many
    over the branches with every question's options: where the backend batches, the input's
    tokens (the branches' common prefix) are evaluated once, each question's text as its own
    sequence after them, and an option's first token is read from its question's last
    logits, so the options of other questions cost nothing. Several inputs go question by
    question, each a classify_many over the inputs (their common prefix shared)."""
    found: list[tuple[dict[str, np.ndarray], int]] = [({}, 0) for _ in prompts]

    def record(i: int, question: Question, result: Classification) -> None:
        values = np.array([result.logprobs[label] for label in _option_labels(question)])
        probabilities = np.exp(values - values.max())
        found[i][0][question.name] = probabilities / probabilities.sum()
        found[i] = (found[i][0], max(found[i][1], result.prompt_tokens))

    if len(prompts) == 1 and len(schema.questions) > 1:
        every = list(dict.fromkeys(o for q in schema.questions for o in _option_labels(q)))
        branches = [prompts[0] + question.ask() for question in schema.questions]
        results = engine.classify_many(branches, every, adapters=active)
        for question, result in zip(schema.questions, results):
            record(0, question, result)
        return found
    for question in schema.questions:
        labels = _option_labels(question)
        asked = [prompt + question.ask() for prompt in prompts]
        if len(asked) == 1:
            results = [engine.classify(asked[0], labels, adapters=active)]
        else:
            results = engine.classify_many(asked, labels, adapters=active)
        for i, result in enumerate(results):
            record(i, question, result)
    return found


def priors(
    engine: Engine, questions: object, adapters: object = ENGINE_ADAPTERS
) -> dict[str, np.ndarray | None]:
    """Each question's prior over its options, as measured on the content-free inputs under
    ``adapters`` (None for a question that is not calibrated)."""
    schema = schema_of(questions)
    active = engine.active_adapters if adapters is ENGINE_ADAPTERS else _adapters(adapters)
    return _priors(engine, schema, active)


def _priors(
    engine: Engine, schema: Schema, active: dict[str, float]
) -> dict[str, np.ndarray | None]:
    """Each question's prior (None where it is not calibrated), measured once per engine,
    template, question and adapter set (with the adapters' files, so that a name loaded
    again from another file is measured again)."""
    paths = engine.adapters
    named = tuple(sorted((n, s, str(paths.get(n))) for n, s in active.items()))
    cache = _PRIORS.setdefault(engine, {})

    def key(question: Question) -> tuple[object, ...]:
        return (schema.template, schema.content_free, question, named)

    missing = [q for q in schema.questions if q.calibrate and key(q) not in cache]
    if missing:
        inputs = [schema.prompt(c) for c in schema.content_free]
        raws = _raw(engine, Schema(tuple(missing), schema.template), inputs, active)
        for question in missing:
            prior = np.mean([raw[question.name] for raw, _ in raws], axis=0)
            cache[key(question)] = prior / prior.sum()
    return {q.name: cache[key(q)] if q.calibrate else None for q in schema.questions}
