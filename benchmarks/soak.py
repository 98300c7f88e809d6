"""Soak: many adapter swaps with a short generation after each, on one engine.

    python benchmarks/soak.py [--backend llamacpp|onnx|mediapipe] [--swaps 1000] [--warmup 50]
                              [--max-tokens 6] [--reload-every 10] [--model PATH] [--json]

Three random LoRA adapters (a, b, c) are written in the backend's format and loaded. Each swap
changes the adapter set, in turn through ``set_adapters`` and through a per-call
``adapters=``, cycling through none, a, b, c and a 50/50 mix of two, then generates a few tokens
of a prompt that changes every time; every fifth swap instead uses adapter a at a scale not
used before (0.10, 0.11, ... cycling through 97 values), which the ONNX and LiteRT-LM backends
serve with a merged adapter file each. Every ``--reload-every`` swaps one adapter is unloaded
and loaded again, since freeing is where leaks hide. The scratch files edgegemma keeps in the
temp folder are measured too.

It reports the process's resident memory (VmRSS) when the warm-up swaps are done and at the
end, and the growth between them (target: under 5 MiB), and the drift: fixed probe requests,
one per adapter state, must give the same tokens at the end as at the start. The probes start
from an empty KV cache, so they compare the engine's and the adapters' state, not how a reused
prefix is rounded.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

import edgegemma
from edgegemma import models
from edgegemma.adapters.gguf import write_lora_gguf
from edgegemma.adapters.peft import read_peft, write_peft
from edgegemma.gguffile import read_header
from edgegemma.memory import peak_rss_mb

PROBE_PROMPT = "The capital of France is"
STATES: list[dict[str, float] | None] = [
    None,
    {"a": 1.0},
    {"b": 1.0},
    {"c": 1.0},
    {"a": 0.5, "b": 0.5},
]
TARGETS = {"q_proj": "attn_q", "v_proj": "attn_v"}
RANK = 4
"""Small enough that two adapters fit LiteRT-LM's one rank-16 LoRA together."""

CONVERT_ARGS = {"onnx": ("--to", "onnx"), "mediapipe": ("--to", "litert", "--lora-rank", "16")}
"""``edgegemma convert GGUF`` arguments that build each backend's model (llama.cpp runs the GGUF)."""


def vm_rss_mb() -> float:
    """This process's resident memory now (VmRSS), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def backend_model(backend: str, gguf: Path) -> Path:
    """The model ``backend`` loads: the GGUF, or its build from the conversion cache."""
    if backend not in CONVERT_ARGS:
        return gguf
    done = subprocess.run(
        [sys.executable, "-m", "edgegemma", "convert", str(gguf), *CONVERT_ARGS[backend]],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(done.stdout.splitlines()[0])


def random_weights(gguf: Path, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """PEFT-named (A, B) pairs on q_proj and v_proj of every layer, shaped from the GGUF."""
    header = read_header(gguf)
    rng = np.random.default_rng(seed)
    weights = {}
    for layer in range(header.arch_value("block_count")):
        for module, tensor in TARGETS.items():
            n_in, n_out = header.tensors[f"blk.{layer}.{tensor}.weight"].shape
            a = rng.normal(0, 0.05, (RANK, n_in)).astype(np.float32)
            b = rng.normal(0, 0.05, (n_out, RANK)).astype(np.float32)
            weights[f"model.layers.{layer}.self_attn.{module}"] = (a, b)
    return weights


def write_adapter(backend: str, gguf: Path, model: Path, folder: Path, seed: int) -> Path:
    """A random adapter in ``backend``'s format, for ``model``."""
    weights = random_weights(gguf, seed)
    if backend == "llamacpp":
        gguf_names = {
            f"blk.{module.split('.')[2]}.{TARGETS[module.rsplit('.', 1)[1]]}.weight": pair
            for module, pair in weights.items()
        }
        return write_lora_gguf(
            folder / f"{seed}.gguf",
            architecture=read_header(gguf).architecture,
            alpha=2 * RANK,
            weights=gguf_names,
        )
    peft = read_peft(write_peft(folder / f"peft-{seed}", weights, alpha=2 * RANK))
    if backend == "onnx":
        from edgegemma.adapters.onnx import from_peft as to_onnx_adapter

        return to_onnx_adapter(peft, folder / f"{seed}.onnx_adapter", model)
    if backend == "mediapipe":
        from edgegemma.adapters.litert import convert_peft

        return convert_peft(peft, folder / f"{seed}.lora", model)
    raise SystemExit(f"soak: no adapter format known for backend {backend!r}")


def soak(
    engine: edgegemma.Engine,
    adapters: Mapping[str, Path],
    *,
    swaps: int,
    warmup: int,
    max_tokens: int,
    reload_every: int,
    progress: Callable[[str], None] = lambda line: None,
) -> dict[str, object]:
    """Run the swaps on ``engine`` (adapters already loaded) and measure; see the module doc."""

    def probes() -> list[list[int]]:
        found = []
        for state in STATES:
            engine.reset()
            found.append(engine.generate(PROBE_PROMPT, max_tokens=8, adapters=state).token_ids)
        return found

    before = probes()
    rss_warm = peak_warm = None
    reloads = 0
    started = time.perf_counter()
    for i in range(swaps):
        state = (
            STATES[i % len(STATES)] if i % 5 != 4 else {"a": round(0.1 + (i // 5 % 97) / 100, 2)}
        )
        prompt = f"Sensor {i % 97}: temperature {20 + i % 61} C, humidity {i % 89} %. Status:"
        if i % 2:
            engine.set_adapters(state)
            engine.generate(prompt, max_tokens=max_tokens)
        else:
            engine.set_adapters(None)
            engine.generate(prompt, max_tokens=max_tokens, adapters=state)
        if reload_every and i % reload_every == reload_every - 1:
            name = "abc"[reloads % 3]
            engine.set_adapters(None)
            engine.unload_adapter(name)
            engine.load_adapter(name, adapters[name])
            reloads += 1
        if i + 1 == warmup:
            rss_warm, peak_warm = vm_rss_mb(), peak_rss_mb()
        if (i + 1) % 100 == 0:
            progress(
                f"{i + 1} swaps, {time.perf_counter() - started:.0f} s, VmRSS {vm_rss_mb():.1f} MiB"
            )
    elapsed = time.perf_counter() - started
    rss_end, peak_end = vm_rss_mb(), peak_rss_mb()
    scratch_mb = (
        sum(
            f.stat().st_size
            for folder in Path(tempfile.gettempdir()).glob("edgegemma-*")
            for f in folder.rglob("*")
            if f.is_file()
        )
        / 2**20
    )
    after = probes()
    drifted = [_state_name(s) for s, b, a in zip(STATES, before, after) if a != b]
    assert rss_warm is not None and peak_warm is not None
    return {
        "backend": engine.backend_name,
        "swaps": swaps,
        "reloads": reloads,
        "warmup_swaps": warmup,
        "seconds": round(elapsed, 1),
        "swaps_per_s": round(swaps / elapsed, 2),
        "rss_after_warmup_mb": round(rss_warm, 1),
        "rss_end_mb": round(rss_end, 1),
        "rss_growth_mb": round(rss_end - rss_warm, 1),
        "peak_rss_after_warmup_mb": round(peak_warm, 1),
        "peak_rss_end_mb": round(peak_end, 1),
        "scratch_files_mb": round(scratch_mb, 1),
        "probes": len(STATES),
        "drifted": drifted,
        "probe_tokens": {_state_name(s): t for s, t in zip(STATES, before)},
    }


def _state_name(state: Mapping[str, float] | None) -> str:
    return "+".join(f"{k}:{v:g}" for k, v in sorted(state.items())) if state else "base"


def _table(report: Mapping[str, object]) -> str:
    rows = [
        ("backend", report["backend"]),
        ("adapter swaps (each followed by a generation)", report["swaps"]),
        ("unload + load cycles", report["reloads"]),
        ("time", f"{report['seconds']} s ({report['swaps_per_s']} swaps/s)"),
        (
            f"VmRSS after {report['warmup_swaps']} warm-up swaps",
            f"{report['rss_after_warmup_mb']} MiB",
        ),
        ("VmRSS at the end", f"{report['rss_end_mb']} MiB"),
        ("growth after warm-up (target < 5 MiB)", f"{report['rss_growth_mb']} MiB"),
        (
            "peak RSS after warm-up / at the end",
            f"{report['peak_rss_after_warmup_mb']} / {report['peak_rss_end_mb']} MiB",
        ),
        ("scratch files in the temp folder at the end", f"{report['scratch_files_mb']} MB"),
        (
            "drift (probes whose tokens changed)",
            f"{len(report['drifted'])} of {report['probes']}"
            + (f": {', '.join(report['drifted'])}" if report["drifted"] else ""),  # type: ignore[arg-type]
        ),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="soak.py", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backend", default="llamacpp", help="llamacpp, onnx or mediapipe (default: %(default)s)"
    )
    parser.add_argument(
        "--model", help="model for the backend (default: gemma3-270m, converted as needed)"
    )
    parser.add_argument("--swaps", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=50, help="swaps before the first RSS reading")
    parser.add_argument(
        "--max-tokens", type=int, default=6, help="tokens generated after each swap"
    )
    parser.add_argument(
        "--reload-every",
        type=int,
        default=10,
        help="unload and reload an adapter every N swaps (0: never)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if not 0 < args.warmup < args.swaps:
        parser.error("--warmup must be between 0 and --swaps")
    gguf = models.fetch("gemma3-270m")
    model = Path(args.model) if args.model else backend_model(args.backend, gguf)
    with tempfile.TemporaryDirectory(prefix="edgegemma-soak-") as folder:
        adapters = {
            name: write_adapter(args.backend, gguf, model, Path(folder), seed)
            for seed, name in enumerate("abc", 1)
        }
        with edgegemma.load(
            model, backend=args.backend, n_ctx=512, n_threads=args.threads
        ) as engine:
            for name, path in adapters.items():
                engine.load_adapter(name, path)
            report = soak(
                engine,
                adapters,
                swaps=args.swaps,
                warmup=args.warmup,
                max_tokens=args.max_tokens,
                reload_every=args.reload_every,
                progress=lambda line: print(f"soak: {line}", file=sys.stderr, flush=True),
            )
    print(json.dumps(report, indent=2) if args.json else _table(report))
    return 0 if not report["drifted"] else 1


if __name__ == "__main__":
    sys.exit(main())
