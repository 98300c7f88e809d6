"""Classify, constrained output and batches against the generate path: the measurements behind
docs/performance.md's "Classification, structured output and batches".

    python benchmarks/structured.py [--backend llamacpp] [--backend onnx] ... [--json out.json]

Per backend, in one process each, one after the other:

- the sensor skill's 300 held-out readings with its adapter, answered by ``generate`` (the
  label as text) and by ``classify`` (the three labels scored): accuracy and latency p50/p99;
- ``classify_many`` of 64 readings against 64 ``classify`` calls: requests per second;
- ``generate_many`` of 8 prompts of one template (64 tokens each, greedy) against 8
  ``generate`` calls: tokens per second;
- 50 ``json_schema`` generations (greedy and sampled, five prompts): how many parse and
  validate against the schema;
- decode speed with and without a constraint that lets the model write 64 tokens freely
  (``regex=[^\\n]{0,400}``, so the mask is computed at every step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "country": {"type": "string", "maxLength": 12},
        "size": {"enum": ["small", "medium", "large"]},
        "capital": {"type": "boolean"},
    },
    "required": ["city", "country", "size", "capital"],
    "additionalProperties": False,
}
JSON_PROMPTS = ["Paris as JSON:", "A city:", "{", "Describe Tokyo in JSON.", "Data:"]


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def measure(backend: str, limit: int | None) -> dict:
    import jsonschema

    import edgegemma
    from edgegemma import models, skills

    out: dict = {"backend": backend}
    with edgegemma.load(backend=backend, n_ctx=1024) as engine:
        engine.load_adapter(
            "sensor", skills.adapter_path("sensor", backend, model=models.BUILD_SOURCE)
        )
        examples = skills.examples("sensor", "test")[:limit]
        labels = skills.LABELS["sensor"]
        for mode in ("generate", "classify"):
            latencies, correct = [], 0
            for example in examples[:3]:  # warm-up
                engine.classify(example.prompt, labels, adapters={"sensor": 1.0})
            for example in examples:
                started = time.perf_counter()
                if mode == "classify":
                    answer = engine.classify(example.prompt, labels, adapters={"sensor": 1.0}).label
                else:
                    answer = engine.generate(
                        example.prompt, adapters={"sensor": 1.0}, **skills.GENERATION["sensor"]
                    ).text
                latencies.append((time.perf_counter() - started) * 1000)
                correct += skills.is_correct("sensor", answer, example)
            out[mode] = {
                "accuracy": correct / len(examples),
                "p50_ms": statistics.median(latencies),
                "p99_ms": p(latencies, 99),
            }
            print(f"[{backend}] {mode}: {out[mode]}", file=sys.stderr, flush=True)
        prompts = [e.prompt for e in examples[:64]]
        started = time.perf_counter()
        for prompt in prompts:
            engine.classify(prompt, labels, adapters={"sensor": 1.0})
        one_by_one = len(prompts) / (time.perf_counter() - started)
        started = time.perf_counter()
        engine.classify_many(prompts, labels, adapters={"sensor": 1.0})
        batched = len(prompts) / (time.perf_counter() - started)
        out["classify_many"] = {"requests_per_s": batched, "one_by_one_per_s": one_by_one}
        stories = [f"Story {i}: once upon a time" for i in range(8)]
        engine.generate_many(stories[:2], max_tokens=4)  # warm-up
        started = time.perf_counter()
        tokens = sum(len(engine.generate(s, max_tokens=64).token_ids) for s in stories)
        one_by_one = tokens / (time.perf_counter() - started)
        started = time.perf_counter()
        tokens = sum(len(r.token_ids) for r in engine.generate_many(stories, max_tokens=64))
        batched = tokens / (time.perf_counter() - started)
        out["generate_many"] = {"tokens_per_s": batched, "one_by_one_per_s": one_by_one}
        print(f"[{backend}] generate_many: {out['generate_many']}", file=sys.stderr, flush=True)
        if engine.features.logits:
            valid = 0
            for i in range(50):
                found = engine.generate(
                    JSON_PROMPTS[i % 5], max_tokens=80, json_schema=SCHEMA,
                    temperature=0.0 if i < 25 else 0.9, seed=i,
                )  # fmt: skip
                try:
                    jsonschema.validate(json.loads(found.text), SCHEMA)
                    valid += 1
                except (ValueError, jsonschema.ValidationError):
                    pass
            out["json_schema_valid_of_50"] = valid
            engine.generate("warm", max_tokens=4, regex="[^\\n]{0,400}")  # builds the vocabulary
            rates: dict[str, list[float]] = {"free": [], "constrained": []}
            for i in range(5):
                prompt = f"Story {i}: once upon a time"
                rates["free"].append(
                    engine.generate(prompt, max_tokens=64, stop=["\n"]).stats.decode_tps
                )
                rates["constrained"].append(
                    engine.generate(prompt, max_tokens=64, regex="[^\\n]{0,400}").stats.decode_tps
                )
            free, constrained = (statistics.median(rates[k]) for k in ("free", "constrained"))
            out["decode_tps"] = {
                "free": free,
                "constrained": constrained,
                "ratio": constrained / free,
            }
        print(f"[{backend}] {out}", file=sys.stderr, flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", action="append", default=[])
    parser.add_argument("--limit", type=int, help="first N sensor readings (default all 300)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    found = [
        measure(backend, args.limit)
        for backend in args.backend or ["llamacpp", "onnx", "mediapipe"]
    ]
    print("| backend | sensor, generate: accuracy / p50 / p99 | sensor, classify: accuracy / p50 / p99 "
          "| classify_many vs one by one (req/s) | generate_many vs one by one (tok/s) "
          "| json_schema valid of 50 | decode constrained / free |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in found:
        g, c, m, n = r["generate"], r["classify"], r["classify_many"], r["generate_many"]
        d = r.get("decode_tps")
        decode = f"{d['constrained']:.1f} / {d['free']:.1f} ({d['ratio']:.2f}x)" if d else "refused"
        print(
            f"| {r['backend']} | {g['accuracy']:.1%} / {g['p50_ms']:.0f} / {g['p99_ms']:.0f} ms "
            f"| {c['accuracy']:.1%} / {c['p50_ms']:.0f} / {c['p99_ms']:.0f} ms "
            f"| {m['requests_per_s']:.1f} vs {m['one_by_one_per_s']:.1f} "
            f"| {n['tokens_per_s']:.1f} vs {n['one_by_one_per_s']:.1f} "
            f"| {r.get('json_schema_valid_of_50', 'refused')} "
            f"| {decode} |"
        )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(found, out, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
