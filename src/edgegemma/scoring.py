"""Answers read from the model's likelihoods instead of generated: perplexity, classify.

The functions take the engine's scoring as plain callables (prompt tokens and continuations
in, each continuation's log-probability out), so that they hold no engine and no lock."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from .backends.base import Features
from .batching import batch_groups
from .errors import InvalidParameterError, NumericalError, TimedOutError
from .results import Classification, Perplexity

Score = Callable[[list[int], list[list[int]]], list[float]]
"""The log-probability of each continuation after a prompt (see ``Backend.score``)."""
ScoreMany = Callable[[list[list[int]], list[list[int]]], list[list[float]]]
""":data:`Score` for several prompts at once, the same continuations after each."""

LABELS_PER_TIMEOUT_CHECK = 32
"""Labels scored between two looks at the clock when ``classify`` has a timeout: each
scoring call after the first re-evaluates only the prompt's last token (its KV is kept)."""


def perplexity(
    score: Score, ids: list[int], bos: list[int], window: int, backend: str
) -> Perplexity:
    """The perplexity of the text ``ids`` stands for, the way llama.cpp's perplexity tool
    measures it: windows of ``window`` tokens (``bos`` first), the second half of each scored
    given every token before it in the window."""
    started = time.perf_counter()
    step = window - len(bos)
    chunks = [ids[i : i + step] for i in range(0, len(ids) - step + 1, step)] or [ids]
    if len(bos) + len(chunks[0]) < 4:
        raise InvalidParameterError(
            f"the text has {len(ids)} tokens; perplexity needs at least {4 - len(bos)}"
        )
    total, count = 0.0, 0
    for chunk in chunks:
        tokens = [*bos, *chunk]
        half = len(tokens) // 2
        [found] = score(tokens[:half], [tokens[half:]])
        total -= found
        count += len(tokens) - half
    _check_finite([total], backend)
    mean = total / count
    return Perplexity(
        perplexity=math.exp(mean),
        mean_nll=mean,
        tokens=count,
        windows=len(chunks),
        window=len(bos) + len(chunks[0]),
        seconds=time.perf_counter() - started,
    )


def check_labels(labels: object) -> list[str]:
    if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence) or not labels:
        raise InvalidParameterError(f"labels must be a non-empty list of strings, got {labels!r}")
    if not all(isinstance(label, str) for label in labels):
        raise InvalidParameterError("every label must be a string")
    if len(set(labels)) != len(labels):
        raise InvalidParameterError(f"labels must be distinct, got {list(labels)!r}")
    return list(labels)


def label_ids(labels: object, tokenize: Callable[[str], list[int]]) -> list[list[int]]:
    """The token ids of each label (checked), tokenized alone, as they follow a prompt."""
    checked = check_labels(labels)
    ids = [tokenize(label) for label in checked]
    empty = [label for label, found in zip(checked, ids) if not found]
    if empty:
        raise InvalidParameterError(f"labels {empty!r} stand for no tokens")
    return ids


def label_totals(
    score: Score, prompt_ids: list[int], label_ids: list[list[int]], timeout: float | None
) -> list[float]:
    """Each label's log-probability after the prompt. With ``timeout`` (seconds from now) the
    labels are scored a few dozen at a time, and a call past it raises TimedOutError (scores
    over part of the labels would be a wrong answer, not a partial one)."""
    started = time.perf_counter()
    step = LABELS_PER_TIMEOUT_CHECK if timeout is not None else len(label_ids)
    totals: list[float] = []
    for first in range(0, len(label_ids), step):
        if timeout is not None and time.perf_counter() - started > timeout:
            raise TimedOutError(
                f"classify took longer than {timeout} s: {first} of {len(label_ids)} labels scored"
            )
        totals += score(prompt_ids, label_ids[first : first + step])
    return totals


def label_totals_many(
    score_many: ScoreMany,
    prompt_ids: list[list[int]],
    label_ids: list[list[int]],
    features: Features,
    n_ctx: int,
) -> list[list[float]]:
    """:func:`label_totals` for each prompt, in the batches the backend can evaluate
    together (it groups them itself where it pads prompts to one length)."""
    longest = max(len(ids) for ids in label_ids)
    if features.batch_same_length:
        sizes = [(len(ids), len(ids) + longest) for ids in prompt_ids]
        groups = batch_groups(sizes, features, n_ctx)
    else:
        groups = [list(range(len(prompt_ids)))]
    totals: list[list[float]] = [[] for _ in prompt_ids]
    for group in groups:
        for i, values in zip(group, score_many([prompt_ids[i] for i in group], label_ids)):
            totals[i] = values
    return totals


def classification(
    labels: Sequence[str],
    totals: Sequence[float],
    prompt_tokens: int,
    seconds: float,
    adapters: Mapping[str, float],
    backend: str,
) -> Classification:
    """The labels' likelihoods, normalised over the labels."""
    values = np.asarray(totals, dtype=np.float64)
    _check_finite(values, backend)
    probabilities = np.exp(values - values.max())
    probabilities /= probabilities.sum()
    names = list(labels)
    return Classification(
        label=names[int(values.argmax())],
        scores={label: float(p) for label, p in zip(names, probabilities)},
        logprobs={label: float(v) for label, v in zip(names, values)},
        prompt_tokens=prompt_tokens,
        seconds=seconds,
        adapters=dict(adapters),
    )


def _check_finite(values: Sequence[float] | np.ndarray, backend: str) -> None:
    if not np.isfinite(np.asarray(values, dtype=np.float64)).all():
        raise NumericalError(
            f"the {backend} backend computed non-finite log-probabilities "
            "(NaN or infinite logits): check the adapter scales"
        )
