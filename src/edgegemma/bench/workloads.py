"""What the bench runs: synthetic token workloads and task workloads from JSONL files.

Synthetic workloads follow llama-bench: ``pp N`` evaluates an N-token prompt and samples one
token (prefill speed), ``tg N`` generates N tokens after a one-token prompt (decode speed).
Their prompts are token ids, fed to the model as they are.

A task workload is a JSONL file, one request per line::

    {"prompt": "...", "expected": "warning", "max_tokens": 4, "stop": ["\\n"]}

``max_tokens`` (default 4) and ``stop`` (default a newline) are optional, and so is
``adapter_prompt``: the prompt used while an adapter is active, for adapters trained on a
bare format while the base model needs a few-shot ``prompt``. Other keys (such as
the raw ``input``) are kept for people and ignored; ``completion`` stands in for a missing
``expected``, so a prompt/completion training file works as it is. A generation is correct
when its first word, lowercased and stripped of punctuation, equals ``expected`` treated the
same way. Workloads shipped with edgegemma live in ``edgegemma/data/workloads`` and are named by their
file stem (``sensor``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from ..errors import InvalidParameterError
from ..jsonl import parse_lines

DEFAULT_TASK_MAX_TOKENS = 4
DEFAULT_TASK_STOP = ("\n",)


@dataclass(frozen=True)
class Synthetic:
    kind: Literal["pp", "tg"]
    tokens: int

    @property
    def name(self) -> str:
        return f"{self.kind}{self.tokens}"

    @property
    def prompt_length(self) -> int:
        return self.tokens if self.kind == "pp" else 1

    @property
    def max_tokens(self) -> int:
        return 1 if self.kind == "pp" else self.tokens


@dataclass(frozen=True)
class TaskExample:
    prompt: str
    expected: str
    max_tokens: int = DEFAULT_TASK_MAX_TOKENS
    stop: tuple[str, ...] = DEFAULT_TASK_STOP
    adapter_prompt: str | None = None
    """The prompt while an adapter is active (its trained format); ``prompt`` if None."""

    def prompt_for(self, adapter: str | None) -> str:
        return self.adapter_prompt if adapter and self.adapter_prompt else self.prompt


@dataclass(frozen=True)
class Task:
    name: str
    source: str
    """The shipped name or the path it was read from."""
    examples: tuple[TaskExample, ...]
    labels: list[str] | None = None
    """The answers as labels to classify into (leading space, as they follow a prompt), when
    the whole task (before ``--task-limit``) is a choice among 2 to 16 distinct answers."""


Workload = Synthetic | Task


def synthetic_ids(
    workload: Synthetic,
    *,
    repetition: int,
    vocab_size: int,
    bos_id: int | None,
    ids: Literal["random", "fixed"],
    seed: int,
) -> list[int]:
    """The prompt of one repetition: BOS, then ids drawn uniformly from the vocabulary.

    ``random`` draws new ids for every repetition; ``fixed`` repeats the same ids. Callers
    reset the KV cache between repetitions either way, so no prompt is served from cache.
    """
    rng = random.Random(f"{seed}:{workload.name}:{repetition if ids == 'random' else 0}")
    head = [bos_id] if bos_id is not None else []
    return head + [rng.randrange(vocab_size) for _ in range(workload.prompt_length - len(head))]


def shipped_tasks() -> list[str]:
    """Names of the task workloads that come with edgegemma."""
    folder = resources.files("edgegemma") / "data" / "workloads"
    return sorted(p.name[: -len(".jsonl")] for p in folder.iterdir() if p.name.endswith(".jsonl"))


def load_task(spec: str, *, limit: int | None = None) -> Task:
    """A shipped task by name, or a JSONL file by path; ``limit`` keeps the first N examples."""
    path = Path(spec).expanduser()
    if path.suffix == ".jsonl" or path.exists():
        if not path.is_file():
            raise InvalidParameterError(f"task workload file not found: {path}")
        text, name = path.read_text(encoding="utf-8"), path.stem
    elif spec in shipped_tasks():
        resource = resources.files("edgegemma") / "data" / "workloads" / f"{spec}.jsonl"
        text, name = resource.read_text(encoding="utf-8"), spec
    else:
        raise InvalidParameterError(
            f"no task workload {spec!r}: give a .jsonl path or one of {', '.join(shipped_tasks())}"
        )
    examples = tuple(_parse_row(spec, n, row) for n, row in parse_lines(text, spec))
    if not examples:
        raise InvalidParameterError(f"task workload {spec} has no examples")
    answers = sorted({normalize_label(e.expected) for e in examples})
    labels = [f" {a}" for a in answers] if 1 < len(answers) <= 16 and all(answers) else None
    if limit is not None:
        examples = examples[:limit]
    return Task(name=name, source=spec, examples=examples, labels=labels)


def _parse_row(spec: str, number: int, row: object) -> TaskExample:
    where = f"{spec} line {number}"
    if not isinstance(row, dict):
        raise InvalidParameterError(f"{where} must be a JSON object")
    prompt, expected = row.get("prompt"), row.get("expected", row.get("completion"))
    if not isinstance(prompt, str) or not prompt or not isinstance(expected, str) or not expected:
        raise InvalidParameterError(
            f'{where} needs non-empty string fields "prompt" and "expected"'
        )
    max_tokens = row.get("max_tokens", DEFAULT_TASK_MAX_TOKENS)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise InvalidParameterError(f"{where}: max_tokens must be a positive integer")
    stop = row.get("stop", list(DEFAULT_TASK_STOP))
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise InvalidParameterError(f"{where}: stop must be a list of non-empty strings")
    adapter_prompt = row.get("adapter_prompt")
    if adapter_prompt is not None and (not isinstance(adapter_prompt, str) or not adapter_prompt):
        raise InvalidParameterError(f"{where}: adapter_prompt must be a non-empty string")
    return TaskExample(
        prompt=prompt,
        expected=expected,
        max_tokens=max_tokens,
        stop=tuple(stop),
        adapter_prompt=adapter_prompt,
    )


def normalize_label(text: str) -> str:
    """The first word of ``text``, lowercased, without surrounding punctuation."""
    words = text.strip().split()
    return words[0].strip(".,;:!?\"'()[]{}*").lower() if words else ""


def is_correct(generated: str, expected: str) -> bool:
    return normalize_label(generated) == normalize_label(expected)


def parse_sizes(value: str, option: str) -> list[int]:
    """``"128,512"`` -> ``[128, 512]``; ``"0"`` -> ``[]`` (the workload is skipped)."""
    try:
        sizes = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise InvalidParameterError(
            f"{option} takes comma-separated token counts, got {value!r}"
        ) from None
    if any(s < 0 for s in sizes):
        raise InvalidParameterError(f"{option} token counts must be >= 0, got {value!r}")
    return [s for s in sizes if s > 0]
