"""What a call may ask for: the options of ``generate``, ``stream`` and ``chat``, their checks,
and the request a checked call becomes."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

import numpy as np

from .backends.base import AdapterHandle
from .constraints import Constraint
from .errors import InvalidParameterError
from .loaded_adapters import Bound
from .sampling import SamplingParams

OverflowPolicy = Literal["error", "truncate_left", "shift"]
OVERFLOW_POLICIES: tuple[str, ...] = ("error", "truncate_left", "shift")
PrefixCachePolicy = Literal["exact", "always"]
PREFIX_CACHE_POLICIES: tuple[str, ...] = ("exact", "always")
DEFAULT_MAX_TOKENS = 256
SAMPLING_OPTIONS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed")
"""The options that make the call's :class:`~edgegemma.sampling.SamplingParams` (same
defaults)."""


class _EngineAdapters:
    """Marker default for ``adapters=``: use the engine's own adapter set."""

    def __repr__(self) -> str:
        return "ENGINE_ADAPTERS"


ENGINE_ADAPTERS = _EngineAdapters()


class ChatOptions(TypedDict, total=False):
    """The options of :meth:`~edgegemma.Engine.chat` and
    :meth:`~edgegemma.Engine.stream_chat`: those of :class:`GenerateOptions` but ``keep``."""

    max_tokens: int | None
    """Tokens to generate at most (default 256); None: until an end token or a full context
    window."""
    temperature: float
    """0 (the default) is greedy decoding; see :class:`~edgegemma.sampling.SamplingParams`
    for this and the other sampling options."""
    top_k: int
    top_p: float
    min_p: float
    repeat_penalty: float
    seed: int | None
    stop: Sequence[str]
    """Strings that end generation; the text stops before the first one."""
    adapters: Mapping[str, float] | None | _EngineAdapters
    """``{name: scale}`` for this call only, instead of the engine's adapter set (None: the
    bare base model)."""
    on_overflow: OverflowPolicy | None
    """The context policy for this call instead of the engine's (docs/design/reliability.md)."""
    timeout: float | None
    """Seconds from the call: generation then ends with finish_reason ``"timeout"`` and the
    text so far."""
    choices: Sequence[str] | None
    """The output is one of these strings (one of ``choices``, ``regex``, ``json_schema``):
    only tokens that keep it a prefix of a valid answer are chosen, and it ends when the answer
    is complete. Needs a backend that shows its logits (llamacpp, onnx)."""
    regex: str | None
    """The output matches this regular expression (as ``choices``)."""
    json_schema: Mapping[str, Any] | str | None
    """The output is JSON valid under this schema (as ``choices``)."""
    logprobs: int | None
    """``k`` in [0, 20]: each generated token's log-probability and the ``k`` most likely
    alternatives in ``Result.logprobs`` (llamacpp, onnx)."""


class GenerateOptions(ChatOptions, total=False):
    """The options of :meth:`~edgegemma.Engine.generate` and
    :meth:`~edgegemma.Engine.stream`, all keyword-only and optional."""

    keep: int | str
    """The protected prompt prefix (a token count, or a string the prompt starts with) that
    ``truncate_left`` and ``shift`` never drop."""


def check_option_names(options: Mapping[str, object], call: str) -> None:
    """A TypeError for a keyword that is no :class:`GenerateOptions`, as Python gives for a
    keyword its signature lacks."""
    unknown = sorted(set(options) - GenerateOptions.__optional_keys__)
    if unknown:
        raise TypeError(f"{call}() got an unexpected keyword argument {unknown[0]!r}")


@dataclass
class Request:
    """A checked call, ready to run: what a stream generates."""

    prompt_ids: list[int]
    protected: int
    max_tokens: int | None
    sampling: SamplingParams
    stop: tuple[str, ...]
    adapters: dict[str, float]
    """The adapter set by name, as the call was made (for :attr:`Result.adapters`)."""
    bound: Bound
    """The loaded adapters those names meant when the call was made: what the call runs."""
    on_overflow: str
    timeout: float | None
    constraint: Constraint | None = None
    logprobs: int | None = None
    dropped: int = 0
    """Prompt tokens dropped before the request was made (old chat turns)."""
    started: float = field(default_factory=time.perf_counter)
    released: bool = False

    @property
    def deadline(self) -> float:
        """When a call with a timeout ends (``time.perf_counter()`` time)."""
        return self.started + self.timeout if self.timeout is not None else math.inf

    @property
    def handles(self) -> list[tuple[AdapterHandle, float]]:
        return handles(self.bound)

    @property
    def kind(self) -> object:
        """What requests must share to run as one batch: sampling settings and adapter set."""
        return (self.sampling, tuple((id(a), s) for a, s in self.bound))


def handles(bound: Bound) -> list[tuple[AdapterHandle, float]]:
    """The backend's handles of bound adapters, with their scales."""
    return [(loaded.handle, scale) for loaded, scale in bound]


def check_max_tokens(max_tokens: object) -> None:
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0
    ):
        raise InvalidParameterError(
            f"max_tokens must be a non-negative integer or None, got {max_tokens!r}"
        )


def check_logprobs(logprobs: object) -> None:
    if logprobs is not None and (
        isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= 20
    ):
        raise InvalidParameterError(f"logprobs must be an integer in [0, 20], got {logprobs!r}")


def check_timeout(timeout: object) -> None:
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0
    ):
        raise InvalidParameterError(
            f"timeout must be a positive number of seconds, got {timeout!r}"
        )


def check_policy(policy: object) -> None:
    if policy not in OVERFLOW_POLICIES:
        raise InvalidParameterError(
            f"on_overflow must be one of {', '.join(OVERFLOW_POLICIES)}; got {policy!r}"
        )


def check_prefix_cache(policy: object) -> None:
    if policy not in PREFIX_CACHE_POLICIES:
        raise InvalidParameterError(
            f"prefix_cache must be one of {', '.join(PREFIX_CACHE_POLICIES)}; got {policy!r}"
        )


def check_stop(stop: object) -> tuple[str, ...]:
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, Sequence) or not all(isinstance(s, str) and s for s in stop):
        raise InvalidParameterError(f"stop must be a list of non-empty strings, got {stop!r}")
    return tuple(stop)


def check_text(text: object) -> str:
    if not isinstance(text, str):
        raise InvalidParameterError(
            f"the prompt must be a str or a list of token ids, got {type(text).__name__}"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidParameterError(f"the prompt is not valid Unicode text: {exc}") from exc
    return text


def check_batch(prompts: object) -> list[Any]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise InvalidParameterError(
            f"prompts must be a list of prompts (text or token ids), got {type(prompts).__name__}"
        )
    return list(prompts)


@dataclass(frozen=True)
class Fitted:
    """How a request fits the context window, under its overflow policy."""

    tokens: list[int]
    """The prompt tokens to evaluate."""
    truncated: int
    """Prompt tokens dropped to make them fit (old chat turns included)."""
    limit: int
    """Tokens it may generate."""
    limit_detail: str
    """Why generation would end at ``limit``, in words."""

    @property
    def cells(self) -> int:
        """KV cells it needs at most: its prompt and every token it may generate."""
        return len(self.tokens) + self.limit


def check_prompt(
    prompt: object, tokenize: Callable[[str], list[int]], vocab_size: int
) -> list[int]:
    """The token ids a prompt stands for: text is tokenized (``tokenize`` puts BOS first), ids
    are taken as they are."""
    if isinstance(prompt, str):
        ids = tokenize(prompt)
        if not ids:
            raise InvalidParameterError(
                "the prompt is empty and this model takes no BOS token: give some text"
            )
        return ids
    if isinstance(prompt, (bytes, bytearray, memoryview)):
        raise InvalidParameterError("the prompt is bytes; decode it to str (or pass token ids)")
    ids = check_ids(prompt, vocab_size)
    if not ids:
        raise InvalidParameterError(
            "the prompt is an empty list of token ids: give text, or at least one id "
            "(ids are taken as they are, so a BOS token is not added)"
        )
    return ids


def check_ids(token_ids: object, vocab_size: int) -> list[int]:
    if isinstance(token_ids, np.ndarray):
        if token_ids.ndim != 1 or not np.issubdtype(token_ids.dtype, np.integer):
            raise InvalidParameterError(
                f"token ids must be a 1-D array of integers, got {token_ids.dtype} "
                f"with shape {token_ids.shape}"
            )
        token_ids = token_ids.tolist()
    if isinstance(token_ids, (str, bytes, bytearray, Mapping)) or not isinstance(
        token_ids, Sequence
    ):
        raise InvalidParameterError(
            "the prompt must be text (str) or a sequence of token ids, "
            f"got {type(token_ids).__name__}"
        )
    ids = []
    for t in token_ids:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise InvalidParameterError(
                f"token ids must be integers, got {t!r} ({type(t).__name__})"
            )
        if not 0 <= t < vocab_size:
            raise InvalidParameterError(f"token id {t} is outside the vocabulary [0, {vocab_size})")
        ids.append(int(t))
    return ids


def protected_length(
    prompt: object,
    prompt_ids: list[int],
    keep: object,
    tokenize: Callable[[str], list[int]],
    *,
    has_bos: bool,
) -> int:
    """The prompt tokens ``keep=`` protects from the context policy (a text prompt's BOS at
    least); ``tokenize`` puts BOS first where the model has one."""
    bos = 1 if isinstance(prompt, str) and has_bos else 0
    if isinstance(keep, str):
        if not isinstance(prompt, str) or not prompt.startswith(keep):
            raise InvalidParameterError("keep= as a string must be a prefix of the text prompt")
        expected = tokenize(keep)
        if prompt_ids[: len(expected)] != expected:
            raise InvalidParameterError(
                f"keep={keep!r} does not end on a token boundary of the prompt; "
                "end it with a space or newline, or pass a token count"
            )
        return len(expected)
    if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep <= len(prompt_ids):
        raise InvalidParameterError(
            f"keep must be a token count in [0, {len(prompt_ids)}] or a prompt prefix, got {keep!r}"
        )
    return max(keep, bos)
