"""JSON Lines as users write them: one JSON value per line, lines ended by ``\\n``.

Only ``\\n`` (and ``\\r\\n``) end a line: ``str.splitlines`` also splits on U+2028, U+0085 and
other characters that JSON allows inside a string, and refused valid files. Each value is
checked for what the libraries after it would choke on (nesting deep enough to exhaust the
parser's stack, a lone surrogate escape such as ``"\\ud800"``, NaN), so a bad line is
refused here, naming its number, not minutes later inside a tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from .errors import InvalidParameterError

MAX_DEPTH = 64
"""Nesting a line may have (objects and arrays); a record needs two or three."""


def parse_lines(text: str, source: str) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` of each non-blank line of ``text``; ``source`` names it in
    errors."""
    for number, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        where = f"{source}:{number}"
        if _depth(line) > MAX_DEPTH:
            raise InvalidParameterError(f"{where}: nested more than {MAX_DEPTH} levels deep")
        try:
            value = json.loads(line, parse_constant=_no_constant)
        except ValueError as exc:
            raise InvalidParameterError(f"{where}: not valid JSON ({exc})") from None
        _check_text(value, where)
        yield number, value


def _depth(line: str) -> int:
    """An upper bound of the nesting of ``line`` (brackets inside strings count too)."""
    depth = deepest = 0
    for char in line:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _check_text(value: Any, where: str) -> None:
    strings = [value] if isinstance(value, str) else []
    if isinstance(value, dict):
        strings += [*value.keys(), *(v for v in value.values() if isinstance(v, str))]
        for item in value.values():
            if isinstance(item, (dict, list)):
                _check_text(item, where)
    elif isinstance(value, list):
        for item in value:
            _check_text(item, where)
    for text in strings:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidParameterError(
                f"{where}: a string holds a lone surrogate ({text.encode('utf-8', 'backslashreplace')[:40]!r}), "
                "which is not text"
            ) from None
