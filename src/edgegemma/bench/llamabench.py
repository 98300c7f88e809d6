"""llama.cpp's own ``llama-bench`` as a reference: command lines and its JSON output.

The harness runs one llama-bench process per workload (``-p N -n 0`` for ``ppN``,
``-p 0 -n N`` for ``tgN``) with ``-o json``, so each process's peak memory is known and a
device that drops off half way leaves the finished workloads in the report. llama-bench
times each repetition of a ``pp`` test as the prompt's evaluation and of a ``tg`` test as N
single-token decodes; it reports neither time to first token nor load time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import EdgeGemmaError
from .stats import summarize
from .workloads import Synthetic


def command(
    binary: str, model: str, workload: Synthetic, *, repetitions: int, threads: int, warmup: int
) -> list[str]:
    pp, tg = (workload.tokens, 0) if workload.kind == "pp" else (0, workload.tokens)
    args = [binary, "-m", model, "-p", str(pp), "-n", str(tg), "-r", str(repetitions)]
    args += ["-t", str(threads), "-o", "json"]
    return args + ([] if warmup else ["--no-warmup"])


def parse_output(text: str) -> list[dict[str, Any]]:
    """The tests in llama-bench's ``-o json`` output (a JSON array, possibly after log lines)."""
    start = text.find("[")
    try:
        tests = json.loads(text[start:]) if start >= 0 else None
    except json.JSONDecodeError as exc:
        raise EdgeGemmaError(
            f"llama-bench printed no valid JSON ({exc}): {text[-300:]!r}"
        ) from None
    if not isinstance(tests, list) or not tests:
        raise EdgeGemmaError(f"llama-bench printed no test results: {text[-300:]!r}")
    return tests


def result_row(tests: Sequence[dict[str, Any]], workload: Synthetic) -> dict[str, Any]:
    """A report row from llama-bench's test for ``workload``."""
    wanted = ("n_prompt", "n_gen")
    sizes = (workload.tokens, 0) if workload.kind == "pp" else (0, workload.tokens)
    matching = [t for t in tests if tuple(t.get(k) for k in wanted) == sizes]
    if not matching:
        raise EdgeGemmaError(f"llama-bench output has no {workload.name} test")
    test = matching[0]
    rates = summarize(test["samples_ts"]).to_dict()
    return {
        "workload": workload.name,
        "kind": workload.kind,
        "adapter": None,
        "requests": len(test["samples_ns"]),
        "prompt_tokens": test["n_prompt"],
        "completion_tokens": test["n_gen"],
        "prefill_tps": rates if workload.kind == "pp" else None,
        "decode_tps": rates if workload.kind == "tg" else None,
        "ttft_s": None,
        "latency_s": summarize([ns / 1e9 for ns in test["samples_ns"]]).to_dict(),
        "accuracy": None,
        "notes": [],
        "model_type": test.get("model_type"),
        "build_commit": test.get("build_commit"),
    }


def empty_run(
    model: Path | str, threads: int, *, runner: str = "llama-bench", label: str = "llama-bench"
) -> dict[str, Any]:
    """A run of one of llama.cpp's own tools, nothing measured yet."""
    return {
        "backend": "llamacpp",
        "runner": runner,
        "label": label,
        "model": Path(model).name,
        "model_path": str(model),
        "model_size_mb": None,
        "threads": threads,
        "n_ctx": None,
        "load_s": None,
        "peak_rss_mb": None,
        "rss_source": None,
        "results": [],
        "adapter_swaps": [],
        "error": None,
    }


def run_local(
    binary: str,
    model: Path,
    workloads: Sequence[Synthetic],
    *,
    repetitions: int,
    threads: int,
    warmup: int,
) -> dict[str, Any]:
    """Run llama-bench on this machine; its peak RSS comes from ``wait4`` on each process."""
    run = empty_run(model, threads)
    run["model_size_mb"] = model.stat().st_size / 2**20
    run["rss_source"] = "ru_maxrss"
    for workload in workloads:
        args = command(
            binary, str(model), workload, repetitions=repetitions, threads=threads, warmup=warmup
        )
        print(f"  [llama-bench] {workload.name}: {' '.join(args)}", file=sys.stderr, flush=True)
        try:
            code, out, err, peak_mb = _run_measured(args)
            if code != 0:
                raise EdgeGemmaError(f"llama-bench exited with {code}: {err.strip()[-300:]}")
            run["results"].append(result_row(parse_output(out), workload))
        except (OSError, EdgeGemmaError) as exc:
            run["error"] = f"{workload.name}: {exc}"
            break
        run["peak_rss_mb"] = max(run["peak_rss_mb"] or 0.0, peak_mb)
    return run


def _run_measured(args: list[str]) -> tuple[int, str, str, float]:
    """Exit code, stdout, stderr and peak RSS (MiB) of a child process."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        peak = usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)
        return (
            process.returncode,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
            peak,
        )
