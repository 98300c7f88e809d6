"""Write the bench's shipped task workload: sensor readings -> normal / warning / critical.

    python benchmarks/make_sensor_workload.py [OUT.jsonl]

Each line is ``{"prompt", "expected", "input"}``: a few-shot prompt for the *base* model (no
adapter yet), the label the rule below gives the reading, and the reading itself. The
readings are drawn with a fixed seed, balanced over the three labels, with fields in any
order, some missing, and numbers written in several ways. Labels come from the rule, never
from a model:

    critical  if temp >= 90 or vib >= 1.5 or batt < 3.3
    warning   elif temp >= 75 or vib >= 0.8 or hum >= 85 or (fan == off and temp >= 60)
    normal    otherwise (a missing field never triggers a condition)
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src/edgegemma/data/workloads/sensor.jsonl"
PER_LABEL = 12
SEED = 2024

INSTRUCTION = (
    "Classify each gateway sensor reading as normal, warning or critical.\n"
    "critical: temp >= 90C, vib >= 1.5g or batt < 3.3V.\n"
    "warning: otherwise, temp >= 75C, vib >= 0.8g, hum >= 85%, or fan=off with temp >= 60C.\n"
    "normal: everything else. Missing fields are fine.\n\n"
)
SHOTS = (
    ("temp=41.5C vib=0.12g batt=3.92V hum=40% rpm=2900 fan=on", "normal"),
    ("vib=0.95g temp=66C hum=52% batt=3.80V", "warning"),
    ("batt=3.12V temp=35.0C rpm=1800 fan=on", "critical"),
    ("hum=61% fan=on rpm=3300 temp=58.4C", "normal"),
    ("temp=93.7C vib=0.40g fan=on batt=3.70V", "critical"),
    ("fan=off temp=63C hum=45% vib=0.2g", "warning"),
)


def label(fields: dict[str, float | str]) -> str:
    temp, vib, batt, hum = (fields.get(k) for k in ("temp", "vib", "batt", "hum"))
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
        or (fields.get("fan") == "off" and temp is not None and temp >= 60)
    ):
        return "warning"
    return "normal"


def draw(rng: random.Random) -> dict[str, float | str]:
    fields: dict[str, float | str] = {
        "temp": round(rng.uniform(20, 100), rng.choice((0, 1, 1, 2))),
        "vib": round(rng.uniform(0.0, 2.0) ** 2 / 2, rng.choice((1, 2, 2))),
        "batt": round(rng.uniform(3.0, 4.2), 2),
        "hum": rng.randint(20, 95),
        "rpm": rng.randrange(800, 4200, 100),
        "fan": rng.choice(("on", "on", "off")),
    }
    for key in rng.sample(list(fields), rng.randint(0, 2)):
        del fields[key]
    return fields


def render(fields: dict[str, float | str], rng: random.Random) -> str:
    units = {"temp": "C", "vib": "g", "batt": "V", "hum": "%", "rpm": "", "fan": ""}
    keys = list(fields)
    rng.shuffle(keys)
    return " ".join(f"{k}={_number(fields[k])}{units[k]}" for k in keys)


def _number(value: float | str) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def prompt(reading: str) -> str:
    shots = "".join(f"Reading: {r}\nLabel: {lab}\n\n" for r, lab in SHOTS)
    return f"{INSTRUCTION}{shots}Reading: {reading}\nLabel:"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0]) if args else OUT
    rng = random.Random(SEED)
    wanted = {"normal": PER_LABEL, "warning": PER_LABEL, "critical": PER_LABEL}
    shot_readings = {r for r, _ in SHOTS}
    rows = []
    while any(wanted.values()):
        fields = draw(rng)
        reading = render(fields, rng)
        expected = label(fields)
        if wanted[expected] and reading not in shot_readings:
            wanted[expected] -= 1
            rows.append({"prompt": prompt(reading), "expected": expected, "input": reading})
    rng.shuffle(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"wrote {len(rows)} examples to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
