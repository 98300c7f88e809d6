"""Calibration of the sensor skill's decisions: the measurements behind docs/performance.md's
"Decisions: calibration and abstention".

    python benchmarks/decisions.py [--limit N] [--json benchmarks/results/decisions-x86-2core.json]

On the default model (llama.cpp) with the sensor adapter, over the held-out readings:

- raw ``classify`` (the labels' likelihoods normalised), ``decide`` with the shipped question
  (no contextual calibration), ``decide`` with contextual calibration (content-free inputs,
  temperature 1), and ``decide`` with a temperature fitted on training readings (the one
  minimising their negative log-likelihood, without and with contextual calibration):
  accuracy and expected calibration error (10 bins) of each;
- for each abstention threshold (``min_confidence``): the share of readings answered and the
  accuracy on those;
- the time of a 3-question schema against one ``classify`` of the same reading (median).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time

import numpy as np

THRESHOLDS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
TEMPERATURES = tuple(round(t, 2) for t in np.arange(0.5, 4.01, 0.25))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="held-out readings (all: 300)")
    parser.add_argument("--fit", type=int, default=150, help="training readings for the fit")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)

    import edgegemma
    from edgegemma import Scale, Schema, YesNo, skills
    from edgegemma.decisions import calibrated, expected_calibration_error, priors

    sensor = {"sensor": 1.0}
    question = skills.QUESTIONS["sensor"]
    test = skills.examples("sensor", "test")[: args.limit]
    train = skills.examples("sensor", "train")
    fit = [train[i * len(train) // args.fit] for i in range(args.fit)]
    truth = [e.completion.strip() for e in test]
    options = question.questions[0].options()

    with edgegemma.load(n_ctx=1024) as engine:
        engine.load_adapter("sensor", skills.adapter_path("sensor"))
        engine.prewarm(question, adapters=sensor)
        raw = engine.classify_many(
            [e.prompt for e in test], skills.LABELS["sensor"], adapters=sensor
        )
        shipped = question.questions[0]

        def variant(**changes: object) -> Schema:
            return Schema((dataclasses.replace(shipped, **changes),), template=question.template)

        contextual = variant(calibrate=True)
        prior = priors(engine, contextual, sensor)["status"]
        assert prior is not None
        fit_raw = engine.decide_many([e.input for e in fit], question, adapters=sensor)
        fit_truth = [e.completion.strip() for e in fit]

        def nll(temperature: float, with_prior: bool) -> float:
            total = 0.0
            for found, label in zip(fit_raw, fit_truth):
                r = np.array([found["status"].raw[o] for o in options])
                p = calibrated(r, prior if with_prior else None, temperature)
                total -= float(np.log(max(p[options.index(label)], 1e-300)))
            return total / len(fit_truth)

        t_plain = min(TEMPERATURES, key=lambda t: nll(t, False))
        t_contextual = min(TEMPERATURES, key=lambda t: nll(t, True))
        variants = {
            "decide_shipped": question,
            "decide_contextual": contextual,
            "decide_temperature": variant(temperature=t_plain),
            "decide_contextual_temperature": variant(calibrate=True, temperature=t_contextual),
        }
        decided = {
            name: engine.decide_many([e.input for e in test], schema, adapters=sensor)
            for name, schema in variants.items()
        }

        three = Schema(
            (
                question.questions[0],
                YesNo("hot", condition="Is the temperature above 75C?"),
                Scale("severity", instruction="How urgent is this reading?"),
            ),
            template=question.template,
        )
        engine.prewarm(three, adapters=sensor)
        one_s, three_s = [], []
        for example in test[:30]:
            started = time.perf_counter()
            engine.classify(example.prompt, skills.LABELS["sensor"], adapters=sensor)
            one_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            engine.decide(example.input, three, adapters=sensor)
            three_s.append(time.perf_counter() - started)

    def summary(labels: list[str], confidences: list[float]) -> dict:
        correct = [a == b for a, b in zip(labels, truth)]
        return {
            "accuracy": sum(correct) / len(correct),
            "ece": expected_calibration_error(confidences, correct),
            "mean_confidence": float(np.mean(confidences)),
            "by_threshold": [
                {
                    "min_confidence": t,
                    "answered": sum(c >= t for c in confidences) / len(confidences),
                    "accuracy_answered": (
                        sum(ok for ok, c in zip(correct, confidences) if c >= t)
                        / max(1, sum(c >= t for c in confidences))
                    ),
                }
                for t in THRESHOLDS
            ],
        }

    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "model": "default (gemma3-270m-embed-iq4_nl), llama.cpp, n_ctx 1024",
        "readings": len(test),
        "fit_readings": len(fit),
        "prior": {o: float(p) for o, p in zip(options, prior)},
        "fitted_temperature": {"plain": t_plain, "contextual": t_contextual},
        "raw_classify": summary(
            [c.label.strip() for c in raw], [max(c.scores.values()) for c in raw]
        ),
        **{
            name: summary(
                [d["status"].label or "" for d in found], [d["status"].confidence for d in found]
            )
            for name, found in decided.items()
        },
        "time_s": {
            "classify_median": statistics.median(one_s),
            "three_question_schema_median": statistics.median(three_s),
            "ratio": statistics.median(three_s) / statistics.median(one_s),
        },
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            out.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
