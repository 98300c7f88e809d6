"""edgegemma's llama.cpp backend as arm64 code (under qemu-user) against this machine's build.

The arm64 side is the Pi-shaped Python of ``tests/arm64_python.py``: Debian's arm64
CPython 3.11 with llama-cpp-python over llama.cpp cross-compiled for arm64 (NEON, dot
product, Q4_0 repacked at load), the same llama.cpp version as here. For each model, both
sides decode greedily with ``logprobs=2`` and score a held-out English text; then the shipped
sensor skill answers held-out readings with its adapter on both. Each side runs its own
build of a variant (made by the quantizer on that architecture, checked against its pin), as a
user there gets it. ``--runtimes`` also runs the onnx and mediapipe backends on their aarch64
wheels (ONNX Runtime GenAI, LiteRT-LM) against the same builds here. Timings under emulation
mean nothing and are not reported.

    python benchmarks/arm64_emulated.py --runtimes --sensor-limit 300 --json benchmarks/results/arm64-emulated.json
    (about 30 minutes on 2 cores; the default --sensor-limit 60 takes 10)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests"), str(HERE.parent / "tests" / "adb_standin")]

import arm64_python
from build_llama_tools import arm64_libraries

MODELS = ("gemma3-270m", "gemma3-270m-q4_0", "gemma3-270m-embed-iq4_nl")
PROMPT = "The capital of France is"
TEXT_CHARS = 1500

# Runs on both sides: the same code, this machine's Python and the emulated arm64 one.
WORKER = r"""
import json, sys
from importlib import resources
import edgegemma
from edgegemma import models, skills
job = json.loads(sys.argv[1])
text = (resources.files("edgegemma") / "data" / "heldout-en.txt").read_text()[: job["chars"]]
out = {}
for name in job["models"]:
    with edgegemma.load(models.resolve(name), n_ctx=512, n_threads=2) as engine:
        result = engine.generate(job["prompt"], max_tokens=job["tokens"], logprobs=2)
        steps = [
            {"token": s.token, "logprob": s.logprob, "top": [[t.token, t.logprob] for t in s.top]}
            for s in result.logprobs
        ]
        out[name] = {"text": result.text, "steps": steps,
                     "perplexity": engine.perplexity(text, window=256).perplexity}
if job["sensor_limit"]:
    with edgegemma.load(n_ctx=512, n_threads=2) as engine:
        engine.load_adapter("sensor", skills.adapter_path("sensor"))
        found = skills.evaluate(engine, "sensor", adapter="sensor", limit=job["sensor_limit"])
        out["sensor"] = {"model": models.default_model("llamacpp"), "correct": found.correct,
                         "total": found.total, "answers": list(found.answers)}
for backend in job["backends"]:
    with edgegemma.load(backend=backend, n_ctx=256, n_threads=2) as engine:
        result = engine.generate(job["prompt"], max_tokens=8)
        out[backend] = {"tokens": result.token_ids, "text": result.text}
print("EDGEGEMMA-RESULT " + json.dumps(out))
"""


def run(python: str, job: dict) -> dict:
    done = subprocess.run(
        [python, "-c", WORKER, json.dumps(job)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"{python} failed:\n{done.stderr[-3000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("EDGEGEMMA-RESULT "))
    return json.loads(line.partition(" ")[2])


def compare(arm: dict, x86: dict) -> dict:
    """Where the greedy tokens part, and how close x86's own top two were there."""
    a, x = arm["steps"], x86["steps"]
    equal = next((i for i, (p, q) in enumerate(zip(a, x)) if p["token"] != q["token"]), len(a))
    row = {
        "tokens": len(a),
        "equal_prefix": equal,
        "arm64_text": arm["text"],
        "x86_text": x86["text"],
        "max_logprob_difference_while_equal": max(
            (abs(p["logprob"] - q["logprob"]) for p, q in zip(a[:equal], x[:equal])), default=0.0
        ),
        "perplexity_arm64": arm["perplexity"],
        "perplexity_x86": x86["perplexity"],
        "perplexity_ratio": arm["perplexity"] / x86["perplexity"],
    }
    if equal < len(a):
        top = x[equal]["top"]
        row["at_divergence"] = {
            "arm64_token_is_x86_second_choice": len(top) > 1 and top[1][0] == a[equal]["token"],
            "x86_top2_gap_nats": top[0][1] - top[1][1] if len(top) > 1 else None,
        }
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=24, help="greedy tokens per model")
    parser.add_argument(
        "--sensor-limit", type=int, default=60, help="held-out sensor readings (0: none)"
    )
    parser.add_argument(
        "--runtimes", action="store_true", help="also the onnx and mediapipe backends' wheels"
    )
    parser.add_argument("--json", type=Path, help="write the comparison here")
    args = parser.parse_args(argv)
    job = {"models": list(MODELS), "prompt": PROMPT, "tokens": args.tokens,
           "chars": TEXT_CHARS, "sensor_limit": args.sensor_limit, "backends": []}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="edgegemma-arm64-") as scratch:
        python = arm64_python.launcher(Path(scratch), libraries=arm64_libraries())
        print("x86-64: this machine's Python", file=sys.stderr)
        x86 = run(sys.executable, job)
        print("arm64: emulated (this takes minutes)", file=sys.stderr)
        arm = run(str(python), job)
        if args.runtimes:
            folder = Path(scratch) / "runtimes"
            folder.mkdir()
            python = arm64_python.launcher(folder, runtimes=True)
            backends = {**job, "models": [], "sensor_limit": 0, "backends": ["onnx", "mediapipe"]}
            x86.update(run(sys.executable, backends))
            arm.update(run(str(python), backends))
    report: dict = {"prompt": PROMPT, "models": {m: compare(arm[m], x86[m]) for m in MODELS}}
    if args.sensor_limit:
        a, x = arm["sensor"], x86["sensor"]
        report["sensor"] = {
            "model": a["model"], "readings": a["total"], "correct_arm64": a["correct"],
            "correct_x86": x["correct"],
            "answers_differ": sum(p != q for p, q in zip(a["answers"], x["answers"])),
        }  # fmt: skip
    if args.runtimes:
        report["runtimes"] = {
            backend: {
                "arm64_text": arm[backend]["text"], "x86_text": x86[backend]["text"],
                "equal_prefix": next(
                    (i for i, (p, q) in enumerate(zip(arm[backend]["tokens"], x86[backend]["tokens"])) if p != q),
                    len(arm[backend]["tokens"]),
                ),
                "tokens": len(arm[backend]["tokens"]),
            }
            for backend in ("onnx", "mediapipe")
        }  # fmt: skip
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
