"""The emoji skill: a short phrase in, one to three fitting emoji out.

The dataset (``data/emoji/phrases.txt``) was written by hand for this project: 120
concepts, each with a target answer of 1-3 emoji, the set of emoji a reader would accept for
it, and six phrasings, the last of which is held out for testing.

**Metric.** The headline score is the *overlap* with the reference answer: the Jaccard index
of the answer's emoji set and the target's (|A∩T| / |A∪T|), averaged over the held-out
phrases, 0 for an answer with anything but emoji in it. It rewards the right emoji *and* the right
number of them, and gives partial credit for half-right answers (🎉 for 🎂🎉 scores 0.5).
Emoji choice is also a matter of taste (🎉 or 🥳 for a party?), so a lenient *hit rate* is
reported beside it: the share of well-formed answers (one to three emoji, nothing else) with
at least one emoji from the concept's accepted set. The hit rate saturates early -- a base
model that answers with any one loosely related emoji passes -- so it cannot tell a model
that learned the task from one that guesses near it; the overlap can.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

_VARIATION_SELECTORS = {0xFE0E, 0xFE0F}
_ZWJ = 0x200D
_KEYCAP = 0x20E3
_SKIN_TONES = range(0x1F3FB, 0x1F400)
_REGIONAL = range(0x1F1E6, 0x1F200)
_EMOJI_RANGES = (
    range(0x1F000, 0x1FB00),
    range(0x2600, 0x27C0),
    range(0x2300, 0x2400),
    range(0x2B00, 0x2C00),
    range(0x2190, 0x2200),
    range(0x2900, 0x2980),
    range(0x25A0, 0x2600),
)
_EMOJI_SINGLES = {
    0x00A9,
    0x00AE,
    0x203C,
    0x2049,
    0x2122,
    0x2139,
    0x24C2,
    0x3030,
    0x303D,
    0x3297,
    0x3299,
}


@dataclass(frozen=True)
class Concept:
    target: str
    accepted: frozenset[str]
    """Emoji units (see :func:`units`) a reader accepts for this concept."""
    phrases: tuple[str, ...]
    """The last one is the held-out test phrase."""


def prompt(text: str) -> str:
    """The prompt the emoji adapter was trained on; it answers with 1-3 emoji."""
    return f"Text: {text.strip()}\nEmoji:"


def units(text: str) -> list[str] | None:
    """The emoji of ``text`` in order, variation selectors dropped; None if it holds other text.

    A unit is one emoji as a reader sees it: a ZWJ sequence (👩‍💻), a flag (🇮🇹) and an emoji
    with a skin tone each count as one.
    """
    found: list[str] = []
    joining = False
    for char in text:
        code = ord(char)
        if code in _VARIATION_SELECTORS:
            continue
        if char.isspace():
            joining = False
            continue
        if code == _ZWJ and found:
            found[-1] += char
            joining = True
        elif joining or (code in _SKIN_TONES or code == _KEYCAP) and found:
            found[-1] += char
            joining = False
        elif code in _REGIONAL and found and _is_lone_regional(found[-1]):
            found[-1] += char
        elif _is_emoji(code):
            found.append(char)
        else:
            return None
    return found


def score(answer: str, accepted: frozenset[str]) -> bool:
    """Whether ``answer`` is 1-3 emoji, at least one of them in ``accepted``."""
    found = units(answer)
    return found is not None and 1 <= len(found) <= 3 and any(u in accepted for u in found)


def jaccard(answer: str, target: str) -> float:
    """Overlap of the answer's emoji with the target answer's (0 for malformed answers)."""
    got, want = set(units(answer) or ()), set(units(target) or ())
    return len(got & want) / len(got | want) if got or want else 0.0


def read_concepts(path: Path) -> list[Concept]:
    """The concepts of a ``phrases.txt`` file (``TARGET | ACCEPTED | phrase; phrase; ...``)."""
    concepts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        target, accepted, phrases = (part.strip() for part in line.split("|"))
        target_units, accepted_units = units(target), units(accepted)
        if not target_units or not accepted_units or not set(target_units) <= set(accepted_units):
            raise ValueError(f"{path}:{number}: the target must be emoji within the accepted set")
        concepts.append(
            Concept(target, frozenset(accepted_units), tuple(p.strip() for p in phrases.split(";")))
        )
    return concepts


def _is_emoji(code: int) -> bool:
    return code in _EMOJI_SINGLES or any(code in r for r in _EMOJI_RANGES)


def _is_lone_regional(unit: str) -> bool:
    return len(unit) == 1 and ord(unit) in _REGIONAL
