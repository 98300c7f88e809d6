"""What the engine's calls return: plain frozen dataclasses, the same on every backend."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "cancelled", "timeout"]


@dataclass(frozen=True)
class Stats:
    """Counts and timings of one generation, measured the same way on every backend."""

    prompt_tokens: int
    """Prompt tokens in the context (after any truncation), BOS included."""
    cached_tokens: int
    """Prompt tokens reused from the KV cache instead of being evaluated."""
    completion_tokens: int
    truncated_tokens: int
    """Prompt tokens dropped by ``truncate_left`` plus cached tokens discarded by ``shift``."""
    ttft_s: float
    """Time from the call to the first generated token (tokenizing and prefill included)."""
    prefill_s: float
    decode_s: float
    total_s: float
    prefill_tps: float
    """Evaluated prompt tokens per second (cached tokens excluded)."""
    decode_tps: float
    """Generated tokens per second after the first one."""
    peak_rss_mb: float
    """High-water mark of this process's resident memory so far."""
    batch_size: int = 1
    """Sequences evaluated together with this one, itself included (:meth:`Engine.generate_many`,
    :meth:`Engine.run_together`; 1: alone)."""
    runtime: dict[str, float] = field(default_factory=dict)
    """The runtime's own figures, where it reports any (LiteRT-LM: ``init_s``,
    ``prefill_tokens``, ``prefill_tps`` and, for a generation it ended itself, ``ttft_s``,
    ``decode_tokens``, ``decode_tps``)."""


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability, and its most likely alternatives."""

    token: int
    text: str
    """The token's text (``\ufffd`` for part of a character)."""
    logprob: float
    """Natural log of its probability in the distribution it was chosen from."""
    top: list[TokenLogprob] = field(default_factory=list)
    """The ``logprobs=k`` most likely tokens at that step, most likely first."""


@dataclass(frozen=True)
class Result:
    """What :meth:`Engine.generate` returns."""

    text: str
    token_ids: list[int]
    """Generated tokens; the end-of-generation token is not included."""
    finish_reason: FinishReason
    finish_detail: str
    """Why generation ended, in words (which stop string, which limit)."""
    adapters: dict[str, float]
    """The adapter set the text was generated with (empty for the bare base model)."""
    stats: Stats
    logprobs: list[TokenLogprob] | None = None
    """Per generated token, with ``logprobs=k`` (backends that show their logits)."""


@dataclass(frozen=True)
class Classification:
    """What :meth:`Engine.classify` returns."""

    label: str
    """The most likely label."""
    scores: dict[str, float]
    """Each label's probability, normalised over the labels (they sum to 1)."""
    logprobs: dict[str, float]
    """Each label's log-probability after the prompt: the sum over its tokens."""
    prompt_tokens: int
    seconds: float
    adapters: dict[str, float]


@dataclass(frozen=True)
class Perplexity:
    """What :meth:`Engine.perplexity` returns."""

    perplexity: float
    """exp of the mean negative log-likelihood of the scored tokens: lower is better."""
    mean_nll: float
    """Mean negative log-likelihood per scored token, in nats."""
    tokens: int
    """Tokens scored (the second half of every window)."""
    windows: int
    window: int
    """Tokens per window, BOS included."""
    seconds: float
