"""Where a model's resident memory goes, step by step: the measurements behind docs/models.md's
"Memory" section.

    python benchmarks/memory.py [--model gemma3-270m-embed-iq4_nl] [--n-ctx 2048] [--json out.json]

In a fresh process each (so every high-water mark is that run's own): import edgegemma, load
the model, generate a short answer, evaluate a long prompt (the shipped held-out text, up to
1500 tokens). After each step it reads VmRSS/VmHWM and splits the resident pages of
``/proc/self/smaps`` by what they map: anonymous memory (llama.cpp's repacked weights, KV
cache, compute buffers, Python's objects), the malloc heap, the model file, shared libraries.
A second process loads only the model's vocabulary (llama.cpp's ``vocab_only``) and reports
how much of the heap that alone takes. Linux only.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from typing import Any

_MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*)$")


def resident() -> dict[str, float]:
    """This process's resident MiB by kind of mapping, with VmRSS and VmHWM."""
    kinds: dict[str, int] = {}
    kind = "anonymous"
    with open("/proc/self/smaps", encoding="utf-8", errors="replace") as smaps:
        for line in smaps:
            found = _MAPPING.match(line)
            if found:
                name = found.group(1).strip()
                kind = (
                    "anonymous" if not name
                    else "heap" if name == "[heap]"
                    else "model file" if name.endswith(".gguf")
                    else "shared libraries" if "/" in name
                    else "other"
                )  # fmt: skip
            elif line.startswith("Rss:"):
                kinds[kind] = kinds.get(kind, 0) + int(line.split()[1])
    out = {k: v / 1024 for k, v in kinds.items()}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out


def steps(model: str, n_ctx: int) -> list[dict]:
    """Run in the worker: the model through its steps, the resident memory after each."""
    from importlib import resources

    import edgegemma

    found = [{"step": "import edgegemma", **resident()}]
    with edgegemma.load(model, n_ctx=n_ctx) as engine:
        found.append({"step": "load", **resident()})
        engine.generate("The capital of France is", max_tokens=24)
        found.append({"step": "short generation", **resident()})
        text = resources.files("edgegemma").joinpath("data/heldout-en.txt").read_text("utf-8")
        ids = engine.tokenize(text)[: min(1500, n_ctx - 8)]
        engine.generate(ids, max_tokens=4)
        found.append({"step": f"{len(ids)}-token prompt", **resident()})
    return found


def vocabulary_heap(model: str) -> dict[str, float]:
    """Run in the worker: the heap that llama.cpp's vocabulary alone takes (vocab_only)."""
    import ctypes

    import llama_cpp as ll

    from edgegemma import models

    libc = ctypes.CDLL(None)
    before = resident().get("heap", 0.0)
    params = ll.llama_model_default_params()
    params.vocab_only = True
    handle = ll.llama_model_load_from_file(str(models.fetch(model)).encode(), params)
    if not handle:
        raise SystemExit(f"llama.cpp could not load the vocabulary of {model}")
    libc.malloc_trim(0)  # what is left is in use, not freed pages the heap kept
    after = resident().get("heap", 0.0)
    ll.llama_model_free(handle)
    return {"heap_before": before, "heap_with_vocabulary": after, "vocabulary": after - before}


def _run_worker(*args: str) -> Any:
    done = subprocess.run(
        [sys.executable, __file__, "--worker", *args],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"worker {args[0]} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma3-270m-embed-iq4_nl")
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--json", help="write the measurements here")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, model, n_ctx = args.worker
        found = steps(model, int(n_ctx)) if kind == "steps" else vocabulary_heap(model)
        print(json.dumps(found))
        return
    if not sys.platform.startswith("linux"):
        raise SystemExit("reads /proc/self/smaps: Linux only")
    found_steps = _run_worker("steps", args.model, str(args.n_ctx))
    vocabulary = _run_worker("vocabulary", args.model, str(args.n_ctx))
    kinds = ("anonymous", "heap", "model file", "shared libraries", "other")
    print(f"{args.model}, n_ctx {args.n_ctx} (MiB resident after each step)")
    print(f"{'step':22} {'VmRSS':>6} {'VmHWM':>6} " + " ".join(f"{k:>16}" for k in kinds))
    for row in found_steps:
        cells = " ".join(f"{row.get(k, 0.0):16.1f}" for k in kinds)
        print(f"{row['step']:22} {row['VmRSS']:6.0f} {row['VmHWM']:6.0f} {cells}")
    alone = vocabulary["vocabulary"]
    print(f"llama.cpp's vocabulary alone (a vocab_only load): {alone:.1f} MiB of the heap")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump({"model": args.model, "n_ctx": args.n_ctx, "steps": found_steps,
                       "vocabulary_heap": vocabulary}, out, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
