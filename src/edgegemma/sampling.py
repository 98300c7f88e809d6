"""Sampling parameters, validated once for every backend."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import InvalidParameterError

SEED_MAX = 2**31 - 1
"""The largest seed: every runtime takes it (llama.cpp reads 2**32-1 as "pick a random seed",
LiteRT-LM takes a C int)."""
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_INT32_MAX = 2**31 - 1

OPTIONAL_SAMPLING: dict[str, float] = {"min_p": 0.0, "repeat_penalty": 1.0}
"""Sampling controls a backend may lack, each with the value that switches it off. A backend
declares the ones it has (:attr:`edgegemma.backends.base.Features.sampling`); a call that
sets one its backend lacks is refused before anything runs."""


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen.

    ``temperature=0`` is greedy decoding (deterministic). ``top_k=0``, ``top_p=1`` and
    ``min_p=0`` disable those filters; ``repeat_penalty=1`` disables the penalty. ``seed=None``
    draws a fresh seed per call; a fixed seed makes sampled output reproducible on the same
    backend (with ``prefix_cache="always"``, from the same KV cache state).
    """

    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None

    def __post_init__(self) -> None:
        # Checked in the types the runtimes take: C floats and ints.
        _check_number("temperature", self.temperature, minimum=0.0, maximum=_FLOAT32_MAX)
        _check_int("top_k", self.top_k, minimum=0, maximum=_INT32_MAX)
        _check_number("top_p", self.top_p, minimum=0.0, exclusive_minimum=True, maximum=1.0)
        _check_number("min_p", self.min_p, minimum=0.0, maximum=1.0)
        _check_number(
            "repeat_penalty",
            self.repeat_penalty,
            minimum=0.0,
            exclusive_minimum=True,
            maximum=_FLOAT32_MAX,
        )
        _check_int("repeat_last_n", self.repeat_last_n, minimum=0, maximum=_INT32_MAX)
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0, maximum=SEED_MAX)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def optional_in_use(self) -> set[str]:
        """The :data:`OPTIONAL_SAMPLING` controls this call switches on."""
        return {name for name, off in OPTIONAL_SAMPLING.items() if getattr(self, name) != off}


def _check_number(
    name: str,
    value: object,
    *,
    minimum: float,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidParameterError(f"{name} must be a finite number, got {value!r}")
    too_small = value <= minimum if exclusive_minimum else value < minimum
    if too_small or (maximum is not None and value > maximum):
        low = "(" if exclusive_minimum else "["
        high = f"{maximum}]" if maximum is not None else "inf)"
        raise InvalidParameterError(f"{name} must be in {low}{minimum}, {high}, got {value!r}")


def _check_int(name: str, value: object, *, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameterError(f"{name} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"[{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        raise InvalidParameterError(f"{name} must be {bound}, got {value!r}")


def check_float32(name: str, value: object) -> None:
    """Refuse ``value`` unless it is a number that stays finite as a C float."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidParameterError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or abs(number) > _FLOAT32_MAX:
        raise InvalidParameterError(
            f"{name} must be finite as a 32-bit float (|x| <= 3.4e38), got {value!r}"
        )
