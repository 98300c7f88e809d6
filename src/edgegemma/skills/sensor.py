"""The sensor skill: label an IoT gateway reading ``normal``, ``warning`` or ``critical``.

A reading is ``key=value`` fields in any order, any of them possibly missing: ``temp``
(°C, ``temp=81.2C``), ``vib`` (g, ``vib=0.93g``), ``batt`` (V, ``batt=3.71V``), ``hum``
(%, ``hum=64%``), ``rpm`` (``rpm=3100``) and ``fan`` (``on``/``off``). The rule the adapter
learns (and :func:`label` computes exactly, as the ground truth):

- **critical** if temp >= 90 or vib >= 1.5 or batt < 3.3;
- else **warning** if temp >= 75 or vib >= 0.8 or hum >= 85 or (fan=off and temp >= 60);
- else **normal**.

:func:`generate` writes the project's training and test readings; they vary number formats,
field order, separators and missing fields so that the adapter has to read the values
rather than memorise readings.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator

LABELS = ("normal", "warning", "critical")
FIELDS = ("temp", "vib", "batt", "hum", "rpm", "fan")

_FIELD = re.compile(r"(temp|vib|batt|hum|rpm|fan)=(-?\d*\.?\d+)?(C|g|V|%|on|off)?")
_SEPARATORS = (" ", " ", " ", ", ", "; ", " | ", ",")


def prompt(reading: str) -> str:
    """The prompt the sensor adapter was trained on; it answers with the label alone."""
    return f"Reading: {reading.strip()}\nStatus:"


def parse(reading: str) -> dict[str, float | str]:
    """The fields of a reading: numbers as floats, ``fan`` as ``"on"``/``"off"``."""
    fields: dict[str, float | str] = {}
    for key, number, unit in _FIELD.findall(reading):
        fields[key] = unit if key == "fan" else float(number)
    return fields


def label(reading: str) -> str:
    """The label the rule gives ``reading``."""
    f = parse(reading)
    temp, vib, batt, hum = (_number_field(f, k) for k in ("temp", "vib", "batt", "hum"))
    if (
        (temp is not None and temp >= 90)
        or (vib is not None and vib >= 1.5)
        or (batt is not None and batt < 3.3)
    ):
        return "critical"
    if (
        (temp is not None and temp >= 75)
        or (vib is not None and vib >= 0.8)
        or (hum is not None and hum >= 85)
        or (f.get("fan") == "off" and temp is not None and temp >= 60)
    ):
        return "warning"
    return "normal"


def _number_field(fields: dict[str, float | str], key: str) -> float | None:
    value = fields.get(key)
    return value if isinstance(value, float) else None


def normalise(text: str) -> str:
    """The label a model's answer names (first word, case-folded), or ``""`` for none."""
    words = re.findall(r"[a-z]+", text.lower())
    return words[0] if words and words[0] in LABELS else ""


def generate(count: int, *, seed: int) -> list[str]:
    """``count`` distinct readings, a third of each label, reproducible from ``seed``."""
    rng = random.Random(seed)
    wanted = {name: count // 3 + (i < count % 3) for i, name in enumerate(LABELS)}
    seen: set[str] = set()
    readings = []
    for reading in _random_readings(rng):
        target = label(reading)
        if wanted[target] and reading not in seen:
            wanted[target] -= 1
            seen.add(reading)
            readings.append(reading)
            if len(readings) == count:
                return readings
    raise AssertionError("unreachable: the reading generator is infinite")


def _random_readings(rng: random.Random) -> Iterator[str]:
    while True:
        present = [name for name in FIELDS if rng.random() < 0.75] or [rng.choice(FIELDS)]
        rng.shuffle(present)
        separator = rng.choice(_SEPARATORS)
        yield separator.join(f"{name}={_value(name, rng)}" for name in present)


# Per field: (range, weight) of each zone. Most values are unremarkable; each field leaves
# its normal zone on its own often enough that every clause of the rule is seen deciding a
# label by itself, and values are drawn across whole zones, so near-threshold values are common.
_ZONES = {
    "temp": (
        ((-15.0, 60.0), 0.45),
        ((60.0, 75.0), 0.25),
        ((75.0, 90.0), 0.15),
        ((90.0, 120.0), 0.15),
    ),
    "vib": (((0.0, 0.8), 0.7), ((0.8, 1.5), 0.15), ((1.5, 3.0), 0.15)),
    # The battery threshold hinges on the tenths digit (3.29 vs 3.3): more values near it.
    "batt": (((3.5, 4.2), 0.45), ((3.3, 3.5), 0.25), ((2.8, 3.3), 0.3)),
    "hum": (((5.0, 85.0), 0.8), ((85.0, 100.0), 0.2)),
}
_DECIMALS = {"temp": 2, "vib": 3, "batt": 3, "hum": 1}
_UNITS = {"temp": "C", "vib": "g", "batt": "V", "hum": "%"}


def _value(name: str, rng: random.Random) -> str:
    if name == "rpm":
        return str(rng.randrange(0, 6000, rng.choice((1, 10, 100))))
    if name == "fan":
        return rng.choice(("on", "off"))
    zones = _ZONES[name]
    (low, high), _ = rng.choices(zones, weights=[w for _, w in zones])[0]
    return _number(rng.uniform(low, high), rng, _DECIMALS[name]) + _UNITS[name]


def _number(value: float, rng: random.Random, max_decimals: int) -> str:
    decimals = rng.choice(range(max_decimals + 1))
    text = f"{value:.{decimals}f}"
    return "0" if text in ("-0", "-0.0", "-0.00") else text
