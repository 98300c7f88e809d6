"""Constrained output: choices, a regular expression or a JSON schema, as token masks.

One mechanism for every backend that shows its logits: llguidance (the engine llama.cpp and
ONNX Runtime GenAI use themselves) compiles the constraint against the backend's own
vocabulary -- the bytes of every token, as the backend renders them -- and before each token
computes which tokens keep the output valid. The backend applies that mask in its sampling
step (:meth:`edgegemma.backends.base.Backend.next_token`), so greedy and sampled decoding,
with any temperature, top-k or top-p, only ever pick tokens the constraint allows.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InvalidParameterError


@dataclass(frozen=True)
class Constraint:
    """A compiled-to-grammar constraint (not yet bound to a vocabulary)."""

    kind: str
    """``choices``, ``regex`` or ``json_schema``."""
    grammar: str
    """llguidance's grammar for it."""


def make_constraint(
    choices: Sequence[str] | None, regex: str | None, json_schema: object | None
) -> Constraint | None:
    """The constraint a call asks for (at most one of the three), checked; None for none."""
    given = [name for name, value in (("choices", choices), ("regex", regex),
                                      ("json_schema", json_schema)) if value is not None]  # fmt: skip
    if not given:
        return None
    import llguidance  # here, not at the top: a process that never constrains skips its memory

    if len(given) > 1:
        raise InvalidParameterError(f"give one constraint, not {' and '.join(given)}")
    kind = given[0]
    if kind == "choices":
        if isinstance(choices, (str, bytes)) or not isinstance(choices, Sequence) or not choices:
            raise InvalidParameterError(
                f"choices must be a non-empty list of strings, got {choices!r}"
            )
        if not all(isinstance(c, str) and c for c in choices):
            raise InvalidParameterError("every choice must be a non-empty string")
        if len(choices) > MAX_CHOICES:
            raise InvalidParameterError(
                f"{len(choices)} choices: at most {MAX_CHOICES} (classify takes a label set "
                "of any size, scored in one pass)"
            )
        # One regular expression, which llguidance's lexer compiles to an automaton: as a
        # grammar of alternatives its parser stopped at 2,000 mid-generation.
        alternatives = "|".join(_regex_literal(c) for c in dict.fromkeys(choices))
        grammar = llguidance.LLMatcher.grammar_from_regex(f"({alternatives})")
    elif kind == "regex":
        if not isinstance(regex, str) or not regex:
            raise InvalidParameterError(f"regex must be a non-empty string, got {regex!r}")
        grammar = llguidance.LLMatcher.grammar_from_regex(regex)
    else:
        schema = _schema(json_schema)
        try:
            # Compact JSON: with free whitespace a small model can wander in blank lines until
            # max_tokens runs out (seen: 60 tokens of newlines between two keys).
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                schema,
                defaults={
                    "whitespace_flexible": False,
                    "item_separator": ", ",
                    "key_separator": ": ",
                },
            )
        except (ValueError, TypeError) as exc:
            raise InvalidParameterError(f"json_schema is not a usable JSON schema: {exc}") from None
    problem = llguidance.LLMatcher.validate_grammar(grammar)
    if problem and not problem.startswith("WARNING"):
        raise InvalidParameterError(f"the {kind.replace('_', ' ')} cannot be used: {problem}")
    return Constraint(kind, grammar)


MAX_CHOICES = 20_000
"""The most ``choices`` a constraint takes."""
_REGEX_META = frozenset("\\.+*?()|[]{}^$#&-~")


def _regex_literal(text: str) -> str:
    """``text`` as a regular expression matching exactly it (Rust regex syntax)."""
    return "".join(f"\\{c}" if c in _REGEX_META else c for c in text)


def _schema(value: object) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise InvalidParameterError(f"json_schema is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidParameterError(f"json_schema must be a JSON object (a dict), got {value!r}")
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:
        raise InvalidParameterError(
            "json_schema holds NaN or Infinity, which no JSON text can contain"
        ) from None
    except (TypeError, RecursionError) as exc:
        raise InvalidParameterError(f"json_schema is not plain JSON data: {exc}") from None
    return value


class Vocabulary:
    """A backend's vocabulary as llguidance sees it: built once per engine (it takes a while for
    Gemma's 262k tokens)."""

    def __init__(
        self,
        token_bytes: Callable[[int], bytes],
        tokenize: Callable[[str], list[int]],
        *,
        vocab_size: int,
        bos_id: int | None,
        eog_ids: frozenset[int],
    ):
        import llguidance

        tokens, special = [], []
        for token in range(vocab_size):
            data = token_bytes(token)
            if not data:
                # A token that stands for no text (BOS, EOS, control tokens): llguidance names
                # special tokens with a leading 0xFF byte, which no text token starts with.
                data = b"\xff<special-%d>" % token
                special.append(token)
            tokens.append(data)

        class _Source:
            eos_token_id = min(eog_ids) if eog_ids else 0
            bos_token_id = bos_id
            special_token_ids = special

            def __call__(self, text: bytes | str) -> list[int]:
                return tokenize(
                    text.decode("utf-8", "replace") if isinstance(text, bytes) else text
                )

        source = _Source()
        source.tokens = tokens  # type: ignore[attr-defined]  # read by TokenizerWrapper
        self.token_bytes = tokens
        self.digit_tokens = np.array(
            [t for t, data in enumerate(tokens) if data.isdigit() and data.isascii()],
            dtype=np.int64,
        )
        """Tokens that are only ASCII digits (what a JSON number's digits are made of)."""
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer(
            llguidance.TokenizerWrapper(source), n_vocab=vocab_size, eos_token=sorted(eog_ids)
        )


MAX_NUMBER_DIGITS = {"integer": 16, "fraction": 16, "exponent": 3}
"""Digits a JSON number may have in each part under a ``json_schema`` constraint: llama.cpp's
schema grammar allows 16 before and 16 after the point; a float needs no more than 3 in the
exponent. JSON itself has no bound, and a small model can repeat ``0`` until ``max_tokens``."""


class _NumberDigits:
    """Where the JSON text generated so far stands: in a string or not, and how many digits
    the number being written has in its integer, fraction and exponent parts."""

    def __init__(self) -> None:
        self.in_string = self.escaped = False
        self.part: str | None = None  # "integer", "fraction", "exponent"; None: no number
        self.count = 0

    def feed(self, data: bytes) -> None:
        for byte in data:
            char = chr(byte)
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif char == "\\":
                    self.escaped = True
                elif char == '"':
                    self.in_string = False
            elif char == '"':
                self.in_string, self.part = True, None
            elif char.isdigit():
                if self.part is None:
                    self.part, self.count = "integer", 0
                self.count += 1
            elif char == "-" and self.part is None:
                self.part, self.count = "integer", 0
            elif char == "." and self.part == "integer":
                self.part, self.count = "fraction", 0
            elif char in "eE" and self.part in ("integer", "fraction"):
                self.part, self.count = "exponent", 0
            elif not (char in "+-" and self.part == "exponent" and self.count == 0):
                self.part = None

    @property
    def full(self) -> bool:
        """Whether the number being written may take no more digits."""
        return self.part is not None and self.count >= MAX_NUMBER_DIGITS[self.part]


class Matcher:
    """One generation's progress through a constraint."""

    def __init__(self, constraint: Constraint, vocabulary: Vocabulary):
        import llguidance
        import llguidance.numpy

        self._numpy = llguidance.numpy
        self._matcher = llguidance.LLMatcher(vocabulary.tokenizer, constraint.grammar, log_level=0)
        if self._matcher.is_error():
            raise InvalidParameterError(
                f"the constraint cannot be used: {self._matcher.get_error()}"
            )
        self._mask = self._numpy.allocate_token_bitmask(1, vocabulary.vocab_size)
        self.kind = constraint.kind
        self._vocabulary = vocabulary
        self._digits = _NumberDigits() if constraint.kind == "json_schema" else None
        self.mask()  # a constraint no text can satisfy fails here, before any token

    def mask(self) -> np.ndarray:
        """The tokens allowed next (packed bits; see :data:`~edgegemma.backends.base.TokenMask`).

        A matcher with no way forward (a schema that only refers to itself, say) is an error,
        never an empty answer: llguidance reports it as stopped, like a finished one."""
        self._numpy.fill_next_token_bitmask(self._matcher, self._mask, 0)
        if self._matcher.is_error():
            reason = self._matcher.get_error().split("\n", 1)[0]
            raise InvalidParameterError(
                f"the {self.kind.replace('_', ' ')} constraint admits no further text "
                f"(llguidance: {reason}); a schema whose definitions only refer to each other "
                "has no finite instance"
            )
        mask: np.ndarray = self._mask[0]
        if self._digits is not None and self._digits.full:
            self._forbid(mask, self._vocabulary.digit_tokens)
        return mask

    @staticmethod
    def _forbid(mask: np.ndarray, tokens: np.ndarray) -> None:
        """Clear ``tokens`` in the packed ``mask``, unless nothing else would be left."""
        words = mask.view(np.uint32)
        kept = words.copy()
        np.bitwise_and.at(words, tokens >> 5, ~(np.uint32(1) << (tokens & 31).astype(np.uint32)))
        if not words.any():  # the schema itself wants more digits (a minimum, say)
            words[:] = kept

    def consume(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise InvalidParameterError(
                f"the constraint refused token {token}: {self._matcher.get_error()}"
            )
        if self._digits is not None:
            self._digits.feed(self._vocabulary.token_bytes[token])

    @property
    def done(self) -> bool:
        """Whether the output is complete: nothing but an end token may follow."""
        return bool(self._matcher.is_stopped())

    @property
    def satisfied(self) -> bool:
        """Whether the output so far is a complete match (it could end here)."""
        return bool(self._matcher.is_accepting())
