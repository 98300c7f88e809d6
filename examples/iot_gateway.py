"""One engine, two skills: label gateway readings and tag operator notes with emoji.

    python examples/iot_gateway.py [--backend llamacpp|onnx|mediapipe] [--generate]

The base model is loaded once; each event picks its skill's LoRA adapter for that one call
(``adapters={skill: 1.0}``), so switching skills costs microseconds, not a model reload.
A reading is classified: one evaluation of the prompt scores the three labels, with a
probability each (``--generate`` generates the label as text instead). The sensor answers are
printed next to what the rule says, to show the adapter at work.
"""

from __future__ import annotations

import argparse
import time

import edgegemma
from edgegemma import skills
from edgegemma.skills import sensor

EVENTS = [
    ("sensor", "temp=71.3C vib=0.42g batt=3.92V hum=48% rpm=2900 fan=on"),
    ("emoji", "the compressor on line 2 is overheating again"),
    ("sensor", "vib=1.72g, temp=64C, rpm=5100"),
    ("sensor", "hum=91%; batt=3.80V; fan=on"),
    ("emoji", "shift over, heading home to sleep"),
    ("sensor", "fan=off temp=66.5C batt=3.7V"),
    ("sensor", "batt=3.12V rpm=1800"),
    ("emoji", "great job team, the line is running again"),
    ("sensor", "temp=23C hum=40% vib=0.05g"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--backend", default="llamacpp", help="llamacpp (default), onnx or mediapipe"
    )
    parser.add_argument("--generate", action="store_true", help="generate sensor labels as text")
    options = parser.parse_args()
    started = time.perf_counter()
    with edgegemma.load(backend=options.backend, n_ctx=1024) as engine:
        for skill in skills.SKILLS:
            engine.load_adapter(skill, skills.adapter_path(skill, options.backend))
        print(
            f"model and both adapters loaded in {time.perf_counter() - started:.1f} s "
            f"({engine.backend_name})\n"
        )
        for skill, text in EVENTS:
            if skill == "sensor" and not options.generate:
                found = engine.classify(
                    skills.prompt(skill, text), skills.LABELS["sensor"], adapters={skill: 1.0}
                )
                answer = found.label.strip()
                check = "ok" if answer == sensor.label(text) else f"rule says {sensor.label(text)}"
                print(
                    f"[sensor {found.seconds * 1000:4.0f} ms] {answer:<8} "
                    f"p={found.scores[found.label]:.2f} {text}  ({check})"
                )
                continue
            result = engine.generate(
                skills.prompt(skill, text), adapters={skill: 1.0}, **skills.GENERATION[skill]
            )
            latency = result.stats.total_s * 1000
            if skill == "sensor":
                answer = skills.sensor_label(result.text) or repr(result.text)
                check = "ok" if answer == sensor.label(text) else f"rule says {sensor.label(text)}"
                print(f"[sensor {latency:4.0f} ms] {answer:<8} {text}  ({check})")
            else:
                print(f"[emoji  {latency:4.0f} ms] {result.text.strip():<8} {text}")


if __name__ == "__main__":
    main()
