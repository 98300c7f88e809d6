"""Write the bench's shipped task workload from the sensor skill's held-out readings.

    python benchmarks/make_sensor_workload.py [OUT.jsonl]

Each line is ``{"prompt", "adapter_prompt", "expected", "input"}``: the base model's few-shot
prompt, the bare prompt the sensor adapter was trained on, the label the skill's rule gives
the reading, and the reading. The readings are an evenly spread, label-balanced subset of
``edgegemma.skills``' test split, so the bench scores the base model and the sensor adapter
(``python -m edgegemma.bench --adapter sensor``) on readings no adapter was trained on.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from edgegemma import skills

OUT = Path(__file__).resolve().parents[1] / "src/edgegemma/data/workloads/sensor.jsonl"
PER_LABEL = 12


def rows() -> list[dict[str, str]]:
    test = skills.examples("sensor", "test")
    shots = skills.few_shot_examples("sensor")
    chosen = []
    for label in skills.sensor.LABELS:
        labelled = [e for e in test if skills.sensor_label(e.completion) == label]
        step = len(labelled) / PER_LABEL
        chosen += [labelled[int(i * step)] for i in range(PER_LABEL)]
    chosen.sort(key=test.index)
    return [
        {
            "prompt": skills.few_shot_prompt("sensor", e.input, shots),
            "adapter_prompt": e.prompt,
            "expected": skills.sensor_label(e.completion),
            "input": e.input,
        }
        for e in chosen
    ]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0]) if args else OUT
    written = rows()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in written))
    print(f"wrote {len(written)} examples to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
